"""The artifact: a folder Hugging Face tooling can read, plus the compressed tensors and a manifest.

    artifact.save(model, tokenizer, "out/smollm2-int8", manifest={"spec": "int8", "base_model": {...}})
    model, tokenizer, kind = artifact.load("out/smollm2-int8")

Layout: ``config.json`` and tokenizer files; ``model.safetensors`` with the tensors exactly as stored (int8 values,
packed int4, scales; mostly-zero tensors as a bit mask plus the non-zero values, so pruning shrinks the bytes on
disk); ``raypress.json`` with the base model, the spec, metrics, library versions and a sha256 of every file.
Writes go to a temporary folder renamed into place, so a crash never leaves a half artifact that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from compress import encoders, files, hf, locate, prune, specs
from compress.digest import weight_digest  # noqa: F401  (where the manifest's base_model digest comes from)

FORMAT = "raypress-artifact"
MANIFEST = "raypress.json"  # the file that makes a folder an artifact
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
SPARSE_MIN_ZERO_FRACTION = 0.4  # below this, mask + values would not save enough to be worth it


class ArtifactError(ValueError):
    """An artifact folder that is incomplete, tampered with, or not an artifact."""


def save(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, manifest: dict | None = None) -> Path:
    """Write ``model`` (compressed or not) and ``tokenizer`` as an artifact at ``out_dir``; returns the path.

    Args:
        manifest: fields to record: ``spec`` (default "base"), ``base_model`` ({"id", "weight_digest"}),
            ``metrics``, and anything else JSON-serializable. Files, versions and format are filled in here.
    """
    out = Path(out_dir)
    with files.new_folder(out) as tmp:
        manifest = dict(manifest or {})
        manifest["spec"] = str(specs.parse(manifest.get("spec", specs.BASE)))
        layers = specs.layer_formats(model, manifest["spec"])
        if layers is not None:
            manifest["layers"] = layers
        tensors, aliases, sparse = _encode_state_dict(model.state_dict())
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        loaded_from = model.config.__dict__.pop("raypress_manifest", None)  # where a loaded artifact came from:
        try:  # the new manifest says that; config.json must not carry the old one along
            model.config.save_pretrained(tmp)
        finally:
            if loaded_from is not None:
                model.config.raypress_manifest = loaded_from
        tokenizer.save_pretrained(tmp)
        source = getattr(model.config, "_name_or_path", "")
        if source and Path(source).is_dir():
            encoders.copy_sentence_transformers_files(Path(source), tmp)
        manifest.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            kind=hf.model_kind(model.config),
            dtype=str(_float_dtype(model)).removeprefix("torch."),
            aliases=aliases,
            sparse=sparse,
            versions=_versions(),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        manifest["files"] = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_json(tmp / MANIFEST, manifest)
    return out


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> hf.LoadedModel:
    """Rebuild the compressed model from an artifact, after checking every file's digest.

    ``dtype`` defaults to the dtype the artifact was saved in, except that a float32 artifact runs in the device's
    own default (bf16 on a GPU; see ``load_dtype``); quantized tensors keep their storage type.
    """
    path = Path(path)
    manifest = verify(path)
    device = torch.device(device) if device is not None else hf.default_device()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    kind = manifest["kind"]
    cls = AutoModelForCausalLM if kind == hf.CAUSAL else AutoModel
    saved_dtype = getattr(torch, manifest["dtype"])
    # No float copy of the model on the way (a 1B model would need 4.4 GB of it to load 1.1 GB of int8): its
    # parameters and the compressed modules' tensors are made on the meta device, and the saved tensors are put in
    # their place. The model's own buffers (rotary tables, position ids) are made for real, as they are not saved.
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=saved_dtype)
    model.tie_weights()  # restore_ must see the tie to rebuild it
    ties = _tied_parameters(model)
    with torch.device("meta"):
        specs.restore_(model, manifest["spec"], manifest.get("layers"))
    state = _decode_state_dict(load_file(str(path / WEIGHTS)), manifest["aliases"], manifest["sparse"])
    model.load_state_dict(state, strict=True, assign=True)
    _materialize(model, ties, path)
    dtype = load_dtype(saved_dtype, dtype, device)
    if dtype != saved_dtype:
        model.to(dtype)
    model.to(device).eval()
    if any(getattr(step, "pattern", None) == "2:4" for step in specs.parse(manifest["spec"]).steps):
        prune.semi_structured_(model)  # sparse tensor cores on GPUs that have them; a no-op elsewhere
    model.config.raypress_manifest = {k: manifest[k] for k in ("spec", "base_model") if k in manifest}
    tokenizer = hf.load_tokenizer(path, kind)
    if kind == hf.ENCODER:
        model.config.raypress_pooling = encoders.read_pooling(path)
    return hf.LoadedModel(model, tokenizer, kind)


def _tied_parameters(model: torch.nn.Module) -> list[list[tuple[torch.nn.Module, str]]]:
    """The places (module, name) that hold one Parameter object, for each parameter held in more than one."""
    holders: dict[int, list] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((module, name))
    return [places for places in holders.values() if len(places) > 1]


def _materialize(model: torch.nn.Module, ties: list, path: Path) -> None:
    """After ``load_state_dict(assign=True)``: tied parameters are one object again (assign wraps each name's
    tensor on its own), dtype markers (empty buffers that are not saved) are made for real, and nothing is left
    on the meta device."""
    for (first, first_name), *rest in ties:
        for module, name in rest:
            setattr(module, name, getattr(first, first_name))
    left = []
    for module_name, module in model.named_modules():
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                if b.numel():
                    left.append(f"{module_name}.{name}")
                else:
                    module._buffers[name] = torch.empty(0, dtype=b.dtype)
    left += [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise ArtifactError(f"{path}: the artifact holds no values for {', '.join(left[:5])}")


def load_dtype(saved: torch.dtype, requested: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The float dtype a loaded artifact runs in: the one asked for; else a float32 artifact (saved on a CPU) takes
    the device's default, bf16 on a GPU; an artifact saved in bf16 or fp16 keeps it."""
    if requested is not None:
        return requested
    return hf.default_dtype(device) if saved == torch.float32 else saved


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.exists():
        raise ArtifactError(locate.interrupted_save(path) or
                            f"{str(path)!r} is not a raypress artifact: it has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{str(file)!r} is not valid JSON ({e}); the artifact is damaged") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{str(file)!r} is not a {FORMAT} manifest (format={found!r})")
    _check_manifest(manifest, file)
    return manifest


DTYPES = ("float32", "float16", "bfloat16")


def _check_manifest(manifest: dict, file: Path) -> None:
    """The fields loading acts on hold what saving writes: file names inside the artifact, a float dtype, a kind.
    (The manifest is not itself digested: the digests detect damage, they do not prove who wrote the artifact.)"""
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise ArtifactError(f"{str(file)!r}: 'files' must map file names to sha256 digests")
    for rel in files:
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel.startswith("~"):
            raise ArtifactError(f"{str(file)!r} lists {rel!r}: artifact files must be relative paths inside it")
    if manifest.get("dtype") not in DTYPES:
        raise ArtifactError(f"{str(file)!r}: dtype {manifest.get('dtype')!r} is not one of {DTYPES}")
    if manifest.get("kind") not in (hf.CAUSAL, hf.ENCODER):
        raise ArtifactError(f"{str(file)!r}: kind {manifest.get('kind')!r} is not {hf.CAUSAL!r} or {hf.ENCODER!r}")


def verify(path: str | os.PathLike) -> dict:
    """Check every file against the manifest's sha256; returns the manifest or raises ArtifactError.

    This detects damage (a truncated copy, a changed file, a missing one), not tampering: whoever can write the
    folder can rewrite raypress.json and its digests too. Load artifacts only from sources you trust."""
    path = Path(path)
    manifest = read_manifest(path)
    for rel, digest in manifest["files"].items():
        file = path / rel
        if not file.exists():
            raise ArtifactError(f"artifact {str(path)!r} is missing {rel!r}; re-create it")
        if _sha256(file) != digest:
            raise ArtifactError(
                f"artifact {str(path)!r}: {rel!r} does not match its sha256 in {MANIFEST} "
                "(changed or truncated after saving); re-create the artifact"
            )
    return manifest


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of every file in the artifact."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weights_bytes(path: str | os.PathLike) -> int:
    """Bytes of the tensor file alone: the model's size, without tokenizer and config."""
    return (Path(path) / WEIGHTS).stat().st_size


def update_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Record measured metrics in the manifest (the manifest is not among the digested files)."""
    manifest = read_manifest(path)
    manifest["metrics"] = metrics
    _write_json(Path(path) / MANIFEST, manifest)


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def _encode_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list]:
    """Deduplicate shared tensors (tied weights) and store mostly-zero ones as mask + values."""
    tensors, aliases, sparse, first = {}, {}, [], {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.numel() else None
        if key is not None and key in first:
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        t = t.detach().to("cpu").contiguous()
        if t.dim() == 2 and t.numel() >= 4096 and (t == 0).float().mean().item() >= SPARSE_MIN_ZERO_FRACTION:
            mask = t != 0
            tensors[f"{name}::mask"] = torch.from_numpy(np.packbits(mask.numpy().reshape(-1)))
            tensors[f"{name}::values"] = t[mask]
            tensors[f"{name}::shape"] = torch.tensor(t.shape, dtype=torch.int64)
            sparse.append(name)
        else:
            tensors[name] = t
    return tensors, aliases, sparse


def _decode_state_dict(tensors: dict, aliases: dict, sparse: list) -> dict:
    state = {k: v for k, v in tensors.items() if "::" not in k}
    for name in sparse:
        shape = tuple(tensors[f"{name}::shape"].tolist())
        values = tensors[f"{name}::values"]
        n = int(np.prod(shape))
        mask = torch.from_numpy(np.unpackbits(tensors[f"{name}::mask"].numpy(), count=n).astype(bool))
        dense = torch.zeros(n, dtype=values.dtype)
        dense[mask] = values
        state[name] = dense.reshape(shape)
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


# ---------------------------------------------------------------------------------------------------------------
# Files


def _write_json(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _versions() -> dict:
    import transformers

    from compress import __version__

    return {
        "raypress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
