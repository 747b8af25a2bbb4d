"""A lean forward for Llama-family decoders (Llama, Mistral, Qwen2 and SmolLM2): the engine's step without the
generic machinery of Hugging Face's forward.

    lean = LeanForward.for_model(model, max_model_len)   # None for other architectures: HF's forward runs
    logits = lean(tokens, layout, cache)                   # [parts, vocab]: the engine's HF path's contract

At decode, a step of a small model spends as long in Python and per-op dispatch as in reading its weights: HF's
forward builds masks, output records and cache objects, and goes through module hooks, for every layer of every
step. This forward runs the same modules' weights (float, int8, int4: whatever ``quantize_`` put there) with the
fewest operations: decode-sized products go straight to raypress's kernels with each layer's weights bound once;
RMSNorm, RoPE (from a cos/sin table built once from the model's own rotary embedding, so its scaling variants carry
over) and the cache write are one op each (``compress.kernels``), and attention is ``SlotKVCache.attend``, the code
the HF path uses. Greedy output is the same token for token as HF's ``generate`` (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress import kernels
from compress.kvcache import Layout, SlotKVCache
from compress.quantize import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")


def _linear(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cheapest call of a projection on x [tokens, K]: for decode-sized x straight to the extension's product
    with the weights bound once (the module's forward checks and reshapes on every call, which at batch 1 cost as
    long as the product); otherwise the module's own forward (raypress's quantized modules without hooks)."""
    general = module.forward if isinstance(module, Int8WeightOnlyLinear | Int4WeightOnlyLinear) else module
    fast, max_rows = _decode_product(module)
    if fast is None:
        return general
    bias = module.bias

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > max_rows or not x.is_contiguous():
            return general(x)
        y = fast(x)
        return y if bias is None else y.add_(bias)

    return call


def _decode_product(module: nn.Module) -> tuple[Callable | None, int]:
    """The extension's product of ``module``'s weights for a few rows, and up to how many rows it is used."""
    ops = kernels.ops()
    if ops is None:
        return None, 0
    if type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.in_features % 16 == 0:
        weight = module.weight.detach().contiguous()
        return (lambda x: ops.f32_gemv(x, weight)), kernels.MAX_F32_KERNEL_ROWS
    if type(module) is Int8WeightOnlyLinear and module.scale.dtype == torch.float32 and module.in_features % 16 == 0:
        q, scale = module.qweight, module.scale
        return (lambda x: ops.int8_gemv(x, q, scale)), kernels.MAX_INT8_KERNEL_ROWS
    if type(module) is Int8DynamicLinear and module.scale.dtype == torch.float32 and module.in_features % 16 == 0:
        q, scale = module.qweight, module.scale
        return (lambda x: ops.int8_dynamic_gemv(x, q, scale)), kernels.MAX_INT8_KERNEL_ROWS
    if type(module) is Int4WeightOnlyLinear and module.group_size % 16 == 0:
        packed, scale, offset, gs = module.packed, module.scale, module.offset, module.group_size
        return (lambda x: ops.int4_gemv(x, packed, scale, offset, gs)), kernels.MAX_INT4_KERNEL_ROWS
    return None, 0


class _Layer:
    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (_linear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.gate, self.up, self.down = (_linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.scaling = attn.scaling
        self.idx = attn.layer_idx


class LeanForward:
    def __init__(self, model, max_model_len: int):
        config = model.config
        inner = model.model
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, _linear(model.lm_head)
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

    @classmethod
    def for_model(cls, model, max_model_len: int) -> LeanForward | None:
        """The lean forward of ``model``, or None (with the reason logged) where it does not apply."""
        reason = unsupported(model)
        if reason:
            log.info("raypress engine: Hugging Face's forward (%s)", reason)
            return None
        return cls(model, max_model_len)

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return kernels.rms_norm(x, norm.weight, self.eps)

    def __call__(self, tokens: torch.Tensor, layout: Layout, cache: SlotKVCache) -> torch.Tensor:
        """Logits [parts, vocab] at each part's last token, for the packed ``tokens`` [N] laid out by ``layout``."""
        n = tokens.shape[0]
        pos = layout.positions[0]
        cos, sin = self.cos[pos], self.sin[pos]  # [N, D]
        h = self.embed(tokens)
        for layer in self.layers:
            x = self._norm(h, layer.norm1)
            q = kernels.rope(layer.q(x).view(n, self.heads, self.head_dim), cos, sin)
            k = kernels.rope(layer.k(x).view(n, self.kv_heads, self.head_dim), cos, sin)
            cache.write(layer.idx, k, layer.v(x).view(n, self.kv_heads, self.head_dim))
            attn = cache.attend(layer.idx, q.transpose(0, 1)[None], layer.scaling)
            h = h + layer.o(attn.view(n, -1))
            x = self._norm(h, layer.norm2)
            h = h + layer.down(F.silu(layer.gate(x)) * layer.up(x))
        return self.head(self._norm(h[layout.last_tokens], self.norm))


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
