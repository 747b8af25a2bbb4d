"""Quantization: one frozen config per scheme, one in-place function.

    quantize_(model, Int8WeightOnlyConfig())
    quantize_(model, Int4WeightOnlyConfig(group_size=128))

Three levels, each named for what it does: tensor math (``quantize_per_channel``), small modules that hold the
stored tensors as buffers (``Int8WeightOnlyLinear``), and a walker that swaps modules (``quantize_``). Modules keep
the quantized tensors exactly as saved in an artifact, so ``restore_`` can rebuild empty ones of the same shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress import kernels

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class CastConfig:
    dtype: str  # "bf16" | "fp16"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"CastConfig.dtype={self.dtype!r}: expected one of {sorted(_DTYPES)}")


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """int8 weights, symmetric, one scale per output channel (per row for embeddings); float activations."""

    embeddings: bool = True


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# Tensor math


def quantize_per_channel(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization: w[N, K] -> (q int8 [N, K], scale [N]) with w ~= q * scale[:, None]."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / qmax
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale


# ---------------------------------------------------------------------------------------------------------------
# Modules


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype).to(w.device)
        q, scale = quantize_per_channel(w)
        mod.qweight.copy_(q)
        mod.scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """Embedding table stored int8 with one scale per row (per token)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=dtype))

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> Int8Embedding:
        w = emb.weight.detach()
        mod = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, w.dtype).to(w.device)
        q, scale = quantize_per_channel(w)
        mod.qweight.copy_(q)
        mod.scale.copy_(scale)
        return mod

    @property
    def weight(self) -> torch.Tensor:  # some model code reads embed.weight (dtype, device, resizing)
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Walkers


def quantize_(model: nn.Module, config) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says; returns it."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = [c.__name__ for c in _HANDLERS]
        raise ValueError(f"no quantization handler for {type(config).__name__}; known: {known}")
    handler(model, config, restore=False)
    return model


def restore_(model: nn.Module, config) -> nn.Module:
    """Swap in empty quantized modules of the shapes ``config`` produces, ready for ``load_state_dict``."""
    _HANDLERS[type(config)](model, config, restore=True)
    return model


def _cast(model: nn.Module, config: CastConfig, restore: bool) -> None:
    model.to(_DTYPES[config.dtype])


def _int8_weight_only(model: nn.Module, config: Int8WeightOnlyConfig, restore: bool) -> None:
    def make_linear(linear: nn.Linear) -> nn.Module:
        if restore:
            w = linear.weight
            return Int8WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None, w.dtype)
        return Int8WeightOnlyLinear.from_float(linear)

    def make_embedding(emb: nn.Embedding) -> nn.Module:
        if restore:
            return Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.weight.dtype)
        return Int8Embedding.from_float(emb)

    swap_modules_(model, make_linear, make_embedding if config.embeddings else None)


def swap_modules_(
    model: nn.Module,
    make_linear: Callable[[nn.Linear], nn.Module],
    make_embedding: Callable[[nn.Embedding], nn.Module] | None = None,
) -> int:
    """Replace every nn.Linear (and nn.Embedding) below ``model``; returns how many were replaced.

    A tied output head (lm_head.weight is the input embedding) becomes a linear view of the quantized table, so the
    table is stored once, as in the float model. Raises when nothing could be replaced.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    new_in_emb = None
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            new = None
            if isinstance(child, nn.Embedding) and make_embedding is not None:
                new = make_embedding(child)
                if child is in_emb:
                    new_in_emb = new
            elif isinstance(child, nn.Linear):
                if tied and child is out_emb:
                    continue  # handled below, once the table is quantized
                if child.in_features < 16:
                    log.info("skip %s %s: too small to quantize", full, tuple(child.weight.shape))
                    continue
                new = make_linear(child)
            if new is not None:
                setattr(module, child_name, new)
                replaced += 1
    if tied:
        head = _tied_head(out_emb, new_in_emb) if new_in_emb is not None else make_linear(out_emb)
        replace_module_(model, out_emb, head)
        replaced += 1
    if replaced == 0:
        raise ValueError(f"nothing to quantize in {type(model).__name__}: it has no nn.Linear or nn.Embedding")
    return replaced


def _tied_head(out_emb: nn.Linear, table: Int8Embedding) -> Int8WeightOnlyLinear:
    head = Int8WeightOnlyLinear(table.embedding_dim, table.num_embeddings, out_emb.bias is not None, table.scale.dtype)
    head.qweight, head.scale = table.qweight, table.scale  # the same tensors: stored once
    if out_emb.bias is not None:
        head.bias = out_emb.bias.detach().clone()
    return head


def replace_module_(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)


_HANDLERS: dict[type, Callable] = {
    CastConfig: _cast,
    Int8WeightOnlyConfig: _int8_weight_only,
}
