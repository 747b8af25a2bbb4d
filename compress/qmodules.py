"""The quantized modules and the tensor math that fills them: what an artifact stores, and how each runs.

    q, scale = quantize_per_channel(w)                          # int8 per output row
    q, scale, offset = quantize_groupwise(w, group_size=64)     # int4 per group, on one of quantize.INT4_GRIDS
    layer = Int8WeightOnlyLinear.from_float(linear)             # buffers as stored; forward on compress.kernels

Two of the three levels of ``compress.quantize``: tensor math (``quantize_per_channel``, ``quantize_groupwise``)
and small modules that hold the stored tensors as buffers (``Int8WeightOnlyLinear``, ``Int8DynamicLinear``,
``Int4WeightOnlyLinear``, ``Int8Embedding``, ``Int4Embedding``). ``compress.quantize`` holds the configs and the
walker that swaps them in; GPTQ, the exporters and the engine's lean runner use these directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress import fbgemm, kernels

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
            packed = fbgemm.prepack(self.qweight, self.scale)
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
        return kernels.int4_linear(x, self.packed, self.scale, self.offset, self.group_size, self.bias,
                                   self.kernel_offset())

    def kernel_offset(self) -> torch.Tensor:
        """``kernels.int4_kernel_offset`` of this layer, found again only when scale or offset changed."""
        key = (self.scale.data_ptr(), self.scale._version, self.offset.data_ptr(), self.offset._version)
        if getattr(self, "_kernel_key", None) != key:
            self._kernel_offset, self._kernel_key = kernels.int4_kernel_offset(self.scale, self.offset), key
        return self._kernel_offset

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
