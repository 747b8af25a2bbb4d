"""Hugging Face model folders: what kind of model a folder holds, where and in what dtype it loads, its tokenizer,
and how its layers are spread over several GPUs.

    loaded = load_pretrained(path, device=default_device())   # LoadedModel(model, tokenizer, kind)

``compress.models.load`` is the entry point users call; it resolves names and artifacts and comes here for plain
folders.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from compress import encoders

CAUSAL, ENCODER = "causal", "encoder"


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    kind: str


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # CPUs without native bf16 run bf16 matmuls hundreds of times slower than float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
        model.config.raypress_pooling = encoders.read_pooling(path)
    return LoadedModel(model, tokenizer, kind)


def load_tokenizer(path: Path, kind: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if kind == CAUSAL:
        tokenizer.padding_side = "left"  # batched generation appends on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(config, default: int = 2048) -> int:
    """Tokens a causal model's position embeddings cover."""
    return int(getattr(config, "max_position_embeddings", None) or default)


def input_limit(path: Path) -> int:
    """Tokens one input of the model in ``path`` may hold: a causal model's context, an encoder's input limit."""
    config = AutoConfig.from_pretrained(path)
    if model_kind(config) == ENCODER:
        config.raypress_pooling = encoders.read_pooling(path)
        return encoders.input_limit(config)
    return context_length(config)


def model_kind(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL
    if getattr(config, "is_decoder", False) or config.model_type in ("llama", "gpt2", "mistral", "qwen2", "phi3"):
        return CAUSAL
    return ENCODER


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
