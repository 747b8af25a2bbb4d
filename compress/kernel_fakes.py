"""The shapes of the CPU extension's ops (compress/csrc) without running them: their fake implementations, which
torch.compile traces and meta tensors run through. ``compress.kernels`` registers them once the extension loads.

    kernel_fakes.register()      # after torch.ops.raypress is loaded
"""

from __future__ import annotations

import torch


def register() -> None:
    """Shapes of the ops' outputs without running them, for torch.compile and meta tensors."""
    lib = "raypress::"

    def stacked(x, weights):  # the products' outputs: every matrix's rows side by side
        return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))

    @torch.library.register_fake(lib + "f32_gemv")
    def _(x, w):
        return stacked(x, w)

    @torch.library.register_fake(lib + "int8_gemv")
    def _(x, q, scale):
        return stacked(x, q)

    @torch.library.register_fake(lib + "int8_dynamic_gemv")
    def _(x, q, scale):
        return stacked(x, q)

    @torch.library.register_fake(lib + "int4_gemv")
    def _(x, q, scale, offset, gs):
        return stacked(x, q)

    @torch.library.register_fake(lib + "rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "add_rms_norm_")
    def _(h, delta, weight, eps):
        return torch.empty_like(h)

    @torch.library.register_fake(lib + "silu_mul")
    def _(gu):
        return gu.new_empty(gu.shape[0], gu.shape[1] // 2)

    @torch.library.register_fake(lib + "rope_write_")
    def _(qkv, cos, sin, keys, values, slots, positions, heads):
        return None

    @torch.library.register_fake(lib + "cache_write_")
    def _(keys, values, k, v, slots, positions):
        return None

    @torch.library.register_fake(lib + "decode_attention")
    def _(q, keys, values, tables, lengths, scale, window):
        return q.new_empty(q.shape)

    @torch.library.register_fake(lib + "decode_layers")
    def _(h, weights, scales, offsets, kind, gs, norms, biases, cos, sin, keys, values, tables, lengths, blocks,
          positions, heads, scaling, eps, window):
        return torch.empty_like(h)

    @torch.library.register_fake(lib + "int4_widen_into")
    def _(q, scale, offset, gs, n0, out):
        return None
