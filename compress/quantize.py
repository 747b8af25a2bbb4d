"""Quantization: one frozen config per scheme, one in-place function.

    quantize_(model, Int8WeightOnlyConfig())
    quantize_(model, Int8DynamicConfig())
    quantize_(model, Int4WeightOnlyConfig(group_size=128))

Three levels, each named for what it does: tensor math (``quantize_per_channel``, ``quantize_groupwise``) and small
modules that hold the stored tensors as buffers (``Int8WeightOnlyLinear``, ...), both in ``compress.qmodules``, and
here the configs and a walker that swaps modules (``swap_modules_``). Modules keep the quantized tensors exactly as
an artifact stores them, so ``restore_`` can build empty ones of the same shapes for loading. Embedding tables are
quantized too (per row, or per group for int4); a tied output head becomes a linear view of the quantized table, so
the table is stored once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compress.qmodules import (
    Int4Embedding,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8WeightOnlyLinear,
)

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GROUP_SIZES = (32, 64, 128)
# int4 grids, by the letter after "int4" in a spec: an integer zero point per group (the field's asymmetric form:
# GPTQ, AWQ, compressed-tensors), symmetric (zero point 8), or the group's own minimum as a float offset (GGUF's
# Q4_1 grid, which re-quantizes weights that came from a Q4_1 file almost exactly, but no integer format holds).
INT4_GRIDS = {"zero_point": "", "symmetric": "s", "min": "m"}


# ---------------------------------------------------------------------------------------------------------------
# Configs


# Every config (here and in gptq, prune, distill) is a step of a spec: ``token`` is its name in spec strings,
# ``apply_(model, restore=, blocks=)`` does it, and ``needs_calibration`` says whether it looks at activations.


@dataclass(frozen=True)
class CastConfig:
    dtype: str  # "bf16" | "fp16"
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"CastConfig.dtype={self.dtype!r}: expected one of {sorted(_DTYPES)}")

    @property
    def token(self) -> str:
        return self.dtype

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks=None) -> None:
        model.to(_DTYPES[self.dtype])


@dataclass(frozen=True)
class _Int8Config:
    needs_calibration: ClassVar[bool] = False

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks=None) -> None:
        swap_modules_(model, *self.makers(restore))

    def makers(self, restore: bool) -> tuple[Callable, Callable]:
        """The (linear, embedding) module makers ``swap_modules_`` takes (``compress.mixed`` picks per layer)."""
        cls = Int8DynamicLinear if isinstance(self, Int8DynamicConfig) else Int8WeightOnlyLinear

        def make_linear(linear: nn.Linear, name: str) -> nn.Module:
            if restore:
                return cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
            return cls.from_float(linear)

        def make_embedding(emb: nn.Embedding, name: str) -> nn.Module:
            if restore:
                return Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.weight.dtype)
            return Int8Embedding.from_float(emb)

        return make_linear, make_embedding


@dataclass(frozen=True)
class Int8WeightOnlyConfig(_Int8Config):
    """int8 weights, symmetric, one scale per output channel (per row for embeddings); float activations."""

    token: ClassVar[str] = "int8"


@dataclass(frozen=True)
class Int8DynamicConfig(_Int8Config):
    """int8 weights per output channel and int8 activations quantized per token at run time (Linear layers).

    Per-token scales keep SmolLM2's perplexity within 3% of float32 without smoothing its activation outliers.
    """

    token: ClassVar[str] = "int8-dynamic"


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """int4 weights, one scale and offset per group of ``group_size`` input columns, two per byte, on one of the
    ``INT4_GRIDS``: ``int4-gN`` (integer zero points), ``int4s-gN`` (symmetric), ``int4m-gN`` (float minimum)."""

    group_size: int = 128
    grid: str = "zero_point"
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self):
        check_int4(type(self).__name__, self.group_size, self.grid)

    @property
    def token(self) -> str:
        return f"int4{INT4_GRIDS[self.grid]}-g{self.group_size}"

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks=None) -> None:
        swap_modules_(model, *self.makers(restore))

    def makers(self, restore: bool) -> tuple[Callable, Callable]:
        gs, grid = self.group_size, self.grid
        return int4_linear_maker(gs, restore, grid=grid), int4_embedding_maker(gs, restore, grid)


def check_int4(owner: str, group_size: int, grid: str) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{owner}.group_size={group_size!r}: expected one of {GROUP_SIZES}")
    if grid not in INT4_GRIDS:
        raise ValueError(f"{owner}.grid={grid!r}: expected one of {sorted(INT4_GRIDS)}")


# ---------------------------------------------------------------------------------------------------------------
# Walkers


def quantize_(model: nn.Module, config, *, restore: bool = False, blocks: torch.Tensor | None = None) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says; returns it.

    Args:
        restore: only swap in empty modules of the right shapes, ready for ``load_state_dict`` (artifact loading).
        blocks: accepted for a uniform signature with the calibrated methods; round-to-nearest ignores it.
    """
    if not callable(getattr(config, "apply_", None)):
        raise ValueError(f"{type(config).__name__} is not a compression config (it has no apply_)")
    config.apply_(model, restore=restore, blocks=blocks)
    return model


def int4_linear_maker(group_size: int, restore: bool, quantized: dict | None = None,
                      grid: str = "zero_point") -> Callable:
    """Make Int4WeightOnlyLinear modules; ``quantized`` maps a layer name to (q, scale, offset) found elsewhere."""

    def make(linear: nn.Linear, name: str) -> nn.Module | None:
        if linear.in_features % 16:
            log.info("skip %s %s: int4 packing needs in_features divisible by 16", name, tuple(linear.weight.shape))
            return None
        if restore:
            return Int4WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        if quantized and name in quantized:
            return Int4WeightOnlyLinear.from_quantized(*quantized[name], group_size, linear.bias)
        return Int4WeightOnlyLinear.from_float(linear, group_size, grid)

    return make


def int4_embedding_maker(group_size: int, restore: bool, grid: str = "zero_point") -> Callable:
    def make(emb: nn.Embedding, name: str) -> nn.Module | None:
        if emb.embedding_dim % 16:
            log.info("skip %s %s: int4 packing needs a width divisible by 16", name, tuple(emb.weight.shape))
            return None
        if restore:
            return Int4Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, group_size, emb.weight.dtype)
        return Int4Embedding.from_float(emb, group_size, grid)

    return make


def swap_modules_(
    model: nn.Module,
    make_linear: Callable[[nn.Linear, str], nn.Module | None],
    make_embedding: Callable[[nn.Embedding, str], nn.Module | None] | None = None,
) -> int:
    """Replace every nn.Linear (and nn.Embedding) below ``model``; returns how many were replaced.

    A maker returns None to keep a layer as it is (it logs why). A tied output head (lm_head.weight is the input
    embedding) becomes ``table.as_linear()`` of the quantized table. Raises when nothing could be replaced.
    """
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    new_table = None
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            new = None
            if isinstance(child, nn.Embedding) and make_embedding is not None:
                new = make_embedding(child, full)
                if child is in_emb:
                    new_table = new
            elif isinstance(child, nn.Linear) and not (tied and child is out_emb):
                new = make_linear(child, full)
            if new is not None:
                setattr(module, child_name, new)
                replaced += 1
    if tied and new_table is not None:  # the head shares the table: it becomes a view of the quantized one
        for module in model.modules():
            for child_name, child in module.named_children():
                if child is out_emb:
                    setattr(module, child_name, new_table.as_linear(out_emb.bias))
        replaced += 1
    if replaced == 0:
        raise ValueError(f"nothing to quantize in {type(model).__name__}: no nn.Linear or nn.Embedding could take it")
    return replaced
