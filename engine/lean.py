"""The lean runner for Llama-family decoders (Llama, Mistral, Qwen2 and SmolLM2): the engine's step without the
generic machinery of Hugging Face's forward.

    runner = LeanRunner.for_model(model, cache, max_model_len)   # None for other architectures: HF's runner runs
    logits = runner.forward(batch)                                # [parts, vocab]: every runner's contract

At decode, a step of a small model spends as long in Python and per-op dispatch as in reading its weights: HF's
forward builds masks, output records and cache objects, and goes through module hooks, for every layer of every
step. This forward runs the same modules' weights (float, int8, int4: whatever ``quantize_`` put there) with the
fewest operations. Per layer, on the CPU extension: the residual add and RMSNorm are one op; q, k and v are one
product over the three matrices (so are gate and up), with each layer's weights bound once; RoPE (from a cos/sin
table built once from the model's own rotary embedding, so its scaling variants carry over) and the cache write are
one op; a decode-only step's attention is one op, otherwise ``PagedKVCache.attend`` (the code the HF path uses);
SiLU times up is one op. That is 9 calls per layer where HF's forward makes dozens. A decode-only step (the most
common step of a server) goes further: all its layers are one call of the extension's ``decode_layers``, which calls the
same ops from C++, so a step pays Python and the dispatcher once instead of some 270 times (SmolLM2); its logits are
bit-identical to the layer-by-layer path. Greedy output is the same token for token as HF's ``generate`` (tested).
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from compress import fbgemm, kernels
from compress.qmodules import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from engine.kvcache import Layout, PagedKVCache

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")


class _Kernel:
    """A stack of matrices that share their input, on one of the extension's products, with every matrix's weights
    bound once (a module's forward checks and reshapes on every call, which at batch 1 costs as long as the
    product). ``kind`` numbers the products as the extension's decode_layers does."""

    F32, INT8, INT8_DYNAMIC, INT4 = 0, 1, 2, 3

    def __init__(self, kind: int, weights: list, scales: list, offsets: list, gs: int, max_rows: int):
        self.kind, self.weights, self.scales, self.offsets, self.gs = kind, weights, scales, offsets, gs
        self.max_rows = max_rows  # up to how many rows of x it is used
        ops = kernels.ops()
        self.run = {  # x [rows, K] -> [rows, every matrix's outputs]
            self.F32: lambda x: ops.f32_gemv(x, weights),
            self.INT8: lambda x: ops.int8_gemv(x, weights, scales),  # GEMV or integer GEMM, at any rows
            self.INT8_DYNAMIC: lambda x: ops.int8_dynamic_gemv(x, weights, scales),
            self.INT4: lambda x: ops.int4_gemv(x, weights, scales, offsets, gs),
        }[kind]


class _Product:
    """One or more projections that share their input (q, k and v; gate and up; or one alone), as one call on x
    [tokens, K] returning their outputs side by side. Decode-sized x goes straight to the extension (``_Kernel``);
    other x to each module's own forward, concatenated. The modules' weights stay the tensors they are, so nothing
    is copied and a saved model is unchanged."""

    def __init__(self, modules: list[nn.Module]):
        self.general = [m.forward if isinstance(m, Int8WeightOnlyLinear | Int4WeightOnlyLinear) else m
                        for m in modules]
        self.kernel = _decode_kernel(modules)
        biases = [m.bias for m in modules]
        given = [b for b in biases if b is not None]
        self.bias = None  # one vector for the stacked outputs (zeros for the modules without)
        if given:
            self.bias = torch.cat([b.detach() if b is not None else given[0].new_zeros(m.out_features)
                                   for m, b in zip(modules, biases, strict=True)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        if k is not None and x.shape[0] <= k.max_rows and x.is_contiguous():
            y = k.run(x)
            return y if self.bias is None else y.add_(self.bias)
        ys = [f(x) for f in self.general]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


def _decode_kernel(modules: list[nn.Module]) -> _Kernel | None:
    """The extension's product of the modules' weights for a few rows; None where the extension is not loaded or
    the modules do not share one kind of weights."""
    ops = kernels.ops()
    kind = type(modules[0])
    if ops is None or any(type(m) is not kind for m in modules) or modules[0].in_features % 16:
        return None
    if any(t.device.type != "cpu" for m in modules for t in (*m.parameters(), *m.buffers())):
        return None  # the extension's ops are CPU ops: on a GPU the modules' own forward runs
    if kind is nn.Linear and all(m.weight.dtype == torch.float32 for m in modules):
        weights = [m.weight.detach().contiguous() for m in modules]
        return _Kernel(_Kernel.F32, weights, [], [], 0, kernels.MAX_F32_KERNEL_ROWS)
    if kind in (Int8WeightOnlyLinear, Int8DynamicLinear) and all(m.scale.dtype == torch.float32 for m in modules):
        qs, scales = [m.qweight for m in modules], [m.scale for m in modules]
        if kind is Int8WeightOnlyLinear:
            return _Kernel(_Kernel.INT8, qs, scales, [], 0, sys.maxsize)
        # int8-dynamic's larger products go to fbgemm where it is exact (kernels.int8_dynamic_linear)
        rows = kernels.MAX_INT8_KERNEL_ROWS if fbgemm.available() and fbgemm.exact() else sys.maxsize
        return _Kernel(_Kernel.INT8_DYNAMIC, qs, scales, [], 0, rows)
    group_sizes = {getattr(m, "group_size", 0) for m in modules}
    if kind is Int4WeightOnlyLinear and len(group_sizes) == 1 and modules[0].group_size % 16 == 0:
        packed, scale = [m.packed for m in modules], [m.scale for m in modules]
        offset = [m.kernel_offset() for m in modules]  # none on the symmetric grid (kernels.int4_kernel_offset)
        symmetric = [o.numel() == 0 for o in offset]
        if any(symmetric) and not all(symmetric):  # grids mixed in one stack: every matrix on its offsets
            offset = [m.offset for m in modules]
        return _Kernel(_Kernel.INT4, packed, scale, offset, modules[0].group_size, kernels.MAX_INT4_KERNEL_ROWS)
    return None


class _FusedLayers:
    """Every decoder layer of a decode-only step as the extension's one ``decode_layers`` op (its arguments, bound
    once): where each layer's products are kernels of one kind and group size, and only q, k and v have biases."""

    def __init__(self, layers: list[_Layer], cache: PagedKVCache):
        products = [p for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        first = products[0].kernel
        self.kind, self.gs = first.kind, first.gs
        self.max_rows = min(p.kernel.max_rows for p in products)
        self.weights = [w for p in products for w in p.kernel.weights]
        self.scales = [s for p in products for s in p.kernel.scales]
        self.offsets = [o for p in products for o in p.kernel.offsets]
        self.norms = [w for layer in layers for w in (layer.norm1, layer.norm2)]
        self.biases = [layer.qkv.bias if layer.qkv.bias is not None else torch.empty(0) for layer in layers]
        self.scaling = [float(layer.scaling) for layer in layers]
        self.keys = [cache.keys[layer.idx] for layer in layers]
        self.values = [cache.values[layer.idx] for layer in layers]

    @staticmethod
    def applies(layers: list[_Layer]) -> bool:
        products = [p for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if kernels.ops() is None or any(p.kernel is None for p in products):
            return False
        if len({(p.kernel.kind, p.kernel.gs) for p in products}) > 1:
            return False
        if any(p.bias is not None for layer in layers for p in (layer.o, layer.gate_up, layer.down)):
            return False
        return all(len(p.kernel.weights) == n for layer in layers
                   for p, n in ((layer.qkv, 3), (layer.o, 1), (layer.gate_up, 2), (layer.down, 1)))


class _Layer:
    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _Product([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Product([attn.o_proj])
        self.gate_up = _Product([mlp.gate_proj, mlp.up_proj])
        self.down = _Product([mlp.down_proj])
        self.norm1, self.norm2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.scaling = attn.scaling
        self.idx = attn.layer_idx


class LeanRunner:
    """The lean forward of one model, bound to the engine's cache."""

    name = "lean"

    def __init__(self, model, cache: PagedKVCache, max_model_len: int):
        self.cache = cache
        config = model.config
        inner = model.model
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm.weight, _Product([model.lm_head])
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        param = next(model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        positions = torch.arange(max_model_len, device=param.device)[None]
        with torch.no_grad():
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=dtype, device=param.device), positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_model_len, head_dim]
        # a decode-only step in one op where the layers allow it (fused = None runs them one by one, as a test does)
        self.fused = _FusedLayers(self.layers, cache) if _FusedLayers.applies(self.layers) else None

    @classmethod
    def for_model(cls, model, cache: PagedKVCache, max_model_len: int) -> LeanRunner | None:
        """The lean runner of ``model``, or None (with the reason logged) where it does not apply."""
        reason = unsupported(model)
        if reason:
            log.info("raypress engine: Hugging Face's forward (%s)", reason)
            return None
        return cls(model, cache, max_model_len)

    def forward(self, batch) -> torch.Tensor:
        """Logits [parts, vocab] of an ``engine.runner.Batch``."""
        return self(batch.tokens, batch.layout, self.cache)

    def __call__(self, tokens: torch.Tensor, layout: Layout, cache: PagedKVCache) -> torch.Tensor:
        """Logits [parts, vocab] at each part's last token, for the packed ``tokens`` [N] laid out by ``layout``."""
        n, heads, dim = tokens.shape[0], self.heads, self.head_dim
        pos = layout.positions[0]
        cos, sin = self.cos[pos], self.sin[pos]  # [N, D]
        h = self.embed(tokens)
        ops = kernels.ops() if kernels.on_cpu_kernels(h) else None
        # decode_attention_applies, decided once per step (h is on the extension, so the cache is too)
        direct_attention = ops is not None and not layout.prefill and dim % kernels.ATTENTION_HEAD_DIM_MULTIPLE == 0
        fused = self.fused
        if direct_attention and fused is not None and n <= fused.max_rows:
            delta = ops.decode_layers(h, fused.weights, fused.scales, fused.offsets, fused.kind, fused.gs,
                                      fused.norms, fused.biases, cos, sin, fused.keys, fused.values,
                                      layout.decode_tables, layout.decode_lengths, layout.token_blocks,
                                      layout.token_offsets, heads, fused.scaling, self.eps, cache.sliding_window or 0)
            last = layout.logit_rows
            return self.head(kernels.rms_norm(h[last] + delta[last], self.norm, self.eps))
        delta = None
        for layer in self.layers:
            if delta is None:
                x = kernels.rms_norm(h, layer.norm1, self.eps)
            else:
                x = kernels.add_rms_norm_(h, delta, layer.norm1, self.eps)  # h += the MLP's output
            qkv = layer.qkv(x)
            self._rope_write(ops, layer.idx, qkv, cos, sin, layout, cache)
            q = qkv[:, : heads * dim].view(n, heads, dim)
            if direct_attention:  # decode only: straight to the op
                attn = ops.decode_attention(q, cache.keys[layer.idx], cache.values[layer.idx], layout.decode_tables,
                                            layout.decode_lengths, layer.scaling, cache.sliding_window or 0)
            else:
                attn = cache.attend(layer.idx, q.transpose(0, 1)[None], layer.scaling)
            x = kernels.add_rms_norm_(h, layer.o(attn.view(n, -1)), layer.norm2, self.eps)  # h += attention's
            delta = layer.down(kernels.silu_mul(layer.gate_up(x)))
        last = layout.logit_rows
        return self.head(kernels.rms_norm(h[last] + delta[last], self.norm, self.eps))

    def _rope_write(self, ops, idx: int, qkv: torch.Tensor, cos, sin, layout: Layout, cache: PagedKVCache) -> None:
        """The rotary embedding of qkv's q and k heads, in place, and its k and v heads into the cache."""
        cache_k, cache_v = cache.keys[idx], cache.values[idx]
        if ops is not None and qkv.is_contiguous():
            ops.rope_write_(qkv, cos, sin, cache_k, cache_v, layout.token_blocks, layout.token_offsets, self.heads)
            return
        n, dim = qkv.shape[0], self.head_dim
        q_width, kv_width = self.heads * dim, self.kv_heads * dim
        qk = qkv[:, : q_width + kv_width].view(n, -1, dim)
        qk.copy_(kernels.rope(qk, cos, sin))
        k, v = qkv[:, q_width : q_width + kv_width], qkv[:, q_width + kv_width :]
        cache.write(idx, k.reshape(n, self.kv_heads, dim), v.reshape(n, self.kv_heads, dim))


def unsupported(model) -> str | None:
    """Why the lean forward cannot run ``model`` (None when it can)."""
    config = model.config
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(model, "lm_head"):
        return "its modules are not laid out as a Llama model's"
    for layer in inner.layers:
        if not all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "an attention layer without separate q/k/v/o projections"
        if not all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return "an MLP without gate/up/down projections"
        if not type(layer.input_layernorm).__name__.endswith("RMSNorm"):
            return f"normalization {type(layer.input_layernorm).__name__}"
    if model.dtype != torch.float32:
        return f"weights in {model.dtype} (the lean forward keeps HF's float32 norm arithmetic only for float32)"
    return None
