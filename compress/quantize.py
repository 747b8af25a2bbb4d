"""Quantization: one frozen config per scheme, one in-place function.

    quantize_(model, Int8WeightOnlyConfig())
    quantize_(model, Int8DynamicConfig())
    quantize_(model, Int4WeightOnlyConfig(group_size=128))

Three levels, each named for what it does: tensor math (``quantize_per_channel``, ``quantize_groupwise``), small
modules that hold the stored tensors as buffers (``Int8WeightOnlyLinear``, ...), and a walker that swaps modules
(``swap_modules_``). Modules keep the quantized tensors exactly as an artifact stores them, so ``restore_`` can
build empty ones of the same shapes for loading. Embedding tables are quantized too (per row, or per group for
int4); a tied output head becomes a linear view of the quantized table, so the table is stored once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compress import kernels

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
        cls = Int8DynamicLinear if isinstance(self, Int8DynamicConfig) else Int8WeightOnlyLinear

        def make_linear(linear: nn.Linear, name: str) -> nn.Module:
            if restore:
                return cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
            return cls.from_float(linear)

        def make_embedding(emb: nn.Embedding, name: str) -> nn.Module:
            if restore:
                return Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.weight.dtype)
            return Int8Embedding.from_float(emb)

        swap_modules_(model, make_linear, make_embedding)


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
        gs, grid = self.group_size, self.grid
        swap_modules_(model, int4_linear_maker(gs, restore, grid=grid), int4_embedding_maker(gs, restore, grid))


def check_int4(owner: str, group_size: int, grid: str) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{owner}.group_size={group_size!r}: expected one of {GROUP_SIZES}")
    if grid not in INT4_GRIDS:
        raise ValueError(f"{owner}.grid={grid!r}: expected one of {sorted(INT4_GRIDS)}")


# ---------------------------------------------------------------------------------------------------------------
# Tensor math


def quantize_per_channel(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization: w[N, K] -> (q int8 [N, K], scale [N]) with w ~= q * scale[:, None]."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / qmax
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale


def group_params(w: torch.Tensor, bits: int = 4, grid: str = "zero_point") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N], offset [N]) of each row of w[N, g], w ~= q * scale + offset, q in 0..2**bits-1, on one of the
    ``INT4_GRIDS``. The integer grids have offset = -zero_point * scale with zero_point an integer in 0..2**bits-1
    (2**(bits-1) for symmetric), so that 0 is exact and integer formats hold them; "min" has offset = the minimum."""
    if grid == "symmetric":
        half = 2 ** (bits - 1)
        scale = (w.abs().amax(dim=1) / (half - 1)).clamp(min=1e-8)
        return scale, -half * scale
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)  # keep 0 inside the range
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    if grid == "min":
        return scale, lo
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)
    return scale, -zero_point * scale


def zero_points(scale: torch.Tensor, offset: torch.Tensor, bits: int = 4) -> torch.Tensor | None:
    """The integer zero points (int64, 0..2**bits-1) of int4 groups on an integer grid (offset = -zp * scale), or
    None for groups whose offsets are not (the "min" grid): what integer formats can store exactly."""
    zp = -offset.double() / scale.double()
    rounded = torch.round(zp)
    if not torch.allclose(zp, rounded, rtol=0, atol=1e-3) or rounded.min() < 0 or rounded.max() > 2**bits - 1:
        return None
    return rounded.to(torch.int64)


def is_symmetric(scale: torch.Tensor, offset: torch.Tensor, bits: int = 4) -> bool:
    """Whether int4 groups are on the symmetric grid (every zero point 2**(bits-1)) that ``group_params`` makes."""
    zp = zero_points(scale, offset, bits)
    return zp is not None and bool((zp == 2 ** (bits - 1)).all())


def quantize_with(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int = 4) -> torch.Tensor:
    return torch.clamp(torch.round((w - offset[:, None]) / scale[:, None]), 0, 2**bits - 1)


def quantize_groupwise(w: torch.Tensor, group_size: int, bits: int = 4, grid: str = "zero_point"):
    """w[N, K] -> (q uint8 [N, K] in 0..2**bits-1, scale [N, G], offset [N, G]), G = ceil(K / group_size).

    The last group is shorter when K is not a multiple of group_size (SmolLM2's 576 = 4 x 128 + 64).
    """
    w = w.float()
    qs, scales, offsets = [], [], []
    for start in range(0, w.shape[1], group_size):
        g = w[:, start : start + group_size]
        scale, offset = group_params(g, bits, grid)
        qs.append(quantize_with(g, scale, offset, bits))
        scales.append(scale)
        offsets.append(offset)
    return torch.cat(qs, 1).to(torch.uint8), torch.stack(scales, 1), torch.stack(offsets, 1)


# ---------------------------------------------------------------------------------------------------------------
# Modules


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> nn.Module:
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


class Int8DynamicLinear(Int8WeightOnlyLinear):
    """Int8 weights and per-token int8 activations. On CPU the weights are packed once for fbgemm's int8 GEMM."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed = None  # fbgemm's packed copy, made on the first CPU forward; False: not available

    @property
    def packed_bytes(self) -> int:
        return 0 if self._packed is None or self._packed is False else self.qweight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None and x.device.type == "cpu":
            packed = kernels.fbgemm_prepack(self.qweight, self.scale) if kernels.fbgemm_available() else None
            self._packed = packed if packed is not None else False
        packed = self._packed if x.device.type == "cpu" and self._packed is not False else None
        return kernels.int8_dynamic_linear(x, self.qweight, self.scale, self.bias, packed)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new weights: pack again on the next forward
        super()._load_from_state_dict(*args, **kwargs)


class Int4WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = -(-in_features // group_size)
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32))
        self.register_buffer("offset", torch.zeros(out_features, groups, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_quantized(cls, q, scale, offset, group_size, bias: torch.Tensor | None) -> Int4WeightOnlyLinear:
        n, k = q.shape
        mod = cls(k, n, bias is not None, group_size, bias.dtype if bias is not None else torch.float32)
        mod = mod.to(q.device)
        mod.packed.copy_(kernels.pack_int4(q))
        mod.scale.copy_(scale)
        mod.offset.copy_(offset)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int, grid: str = "zero_point") -> Int4WeightOnlyLinear:
        q, scale, offset = quantize_groupwise(linear.weight.detach(), group_size, grid=grid)
        return cls.from_quantized(q, scale, offset, group_size, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int4_linear(x, self.packed, self.scale, self.offset, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Embedding(nn.Module):
    """Embedding table stored int8 with one scale per row (per token)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, dtype=torch.float32):
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
    def weight(self) -> torch.Tensor:  # model code may read embed.weight (its dtype, device, or values)
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def as_linear(self, bias: torch.Tensor | None) -> nn.Module:
        """The tied output head: a linear layer over the same stored tensors."""
        head = Int8WeightOnlyLinear(self.embedding_dim, self.num_embeddings, bias is not None, self.scale.dtype)
        head.qweight, head.scale = self.qweight, self.scale
        if bias is not None:
            head.bias = bias.detach().clone()
        return head


class Int4Embedding(nn.Module):
    """Embedding table stored as packed int4 with a scale and offset per group of each row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, group_size: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.group_size = group_size
        groups = -(-embedding_dim // group_size)
        self.register_buffer("packed", torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(num_embeddings, groups, dtype=torch.float32))
        self.register_buffer("offset", torch.zeros(num_embeddings, groups, dtype=torch.float32))
        # the model's float dtype, which the rows are returned in; it follows model.to(dtype), as buffers do
        self.register_buffer("out_dtype", torch.empty(0, dtype=dtype), persistent=False)

    @classmethod
    def from_float(cls, emb: nn.Embedding, group_size: int, grid: str = "zero_point") -> Int4Embedding:
        w = emb.weight.detach()
        mod = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, group_size, w.dtype).to(w.device)
        q, scale, offset = quantize_groupwise(w, group_size, grid=grid)
        mod.packed.copy_(kernels.pack_int4(q))
        mod.scale.copy_(scale)
        mod.offset.copy_(offset)
        return mod

    @property
    def weight(self) -> torch.Tensor:
        return kernels.widen_int4(self.packed, self.scale, self.offset, self.group_size).to(self.out_dtype.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = kernels.widen_int4(self.packed[flat], self.scale[flat], self.offset[flat], self.group_size)
        return rows.view(*ids.shape, self.embedding_dim).to(self.out_dtype.dtype)

    def as_linear(self, bias: torch.Tensor | None) -> nn.Module:
        head = Int4WeightOnlyLinear(self.embedding_dim, self.num_embeddings, bias is not None, self.group_size)
        head.packed, head.scale, head.offset = self.packed, self.scale, self.offset
        if bias is not None:
            head.bias = bias.detach().clone()
        return head


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
