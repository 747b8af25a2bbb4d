"""SmoothQuant: move activation outliers into the weights before int8 activations round them.

    smooth_(model, blocks)            # in place; the model computes the same function, in float, as before
    SmoothInt8DynamicConfig()         # spec "smooth-int8-dynamic": smooth_, then int8-dynamic

Per-token int8 rounds a whole token on one grid, so a few channels far larger than the rest (common in the inputs of
the attention and MLP projections) leave the others a handful of levels. Dividing input channel j by s_j and
multiplying column j of the weights that read it by s_j leaves their product unchanged and evens the channels out:
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha). The division is folded into the norm that feeds those layers (its
weight, and bias where it has one), so the smoothed model runs the same ops as before. alpha is searched per group
of layers on the calibration text: the value whose int8 product (per-token activations, per-channel weights, as
``Int8DynamicLinear`` rounds them) is closest to the float product, alpha 0 (no smoothing) among the candidates.

Groups (Llama family: Llama, Mistral, Qwen2, SmolLM): ``input_layernorm`` -> q, k, v projections;
``post_attention_layernorm`` -> gate, up; ``up_proj``'s rows -> ``down_proj`` (its input is act(gate) * up, channel
by channel); ``v_proj``'s rows -> ``o_proj`` (attention mixes tokens, not channels; under grouped-query attention the
heads that share a value head share its scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compress import calibrate, quantize

ALPHAS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SAMPLE_ROWS = 1024  # calibration tokens per group the search compares products on


@dataclass(frozen=True)
class SmoothGroup:
    name: str
    source: nn.Module  # what makes the linears' input: a norm, or a linear whose outputs feed them channel by channel
    linears: tuple[nn.Linear, ...]
    index: torch.Tensor | None = None  # the source channel each input channel of the linears reads (None: the same)


def groups(model: nn.Module) -> list[SmoothGroup]:
    """The (norm -> linears) pairs of the model's blocks; ValueError for an architecture with none."""
    stack = calibrate.transformer_blocks(model)
    found = []
    for i, block in enumerate(stack if stack is not None else []):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        pairs = [("input_layernorm", getattr(block, "input_layernorm", None), attn, ("q_proj", "k_proj", "v_proj")),
                 ("post_attention_layernorm", getattr(block, "post_attention_layernorm", None), mlp,
                  ("gate_proj", "up_proj")),
                 ("mlp.up_proj", getattr(mlp, "up_proj", None), mlp, ("down_proj",))]  # act(gate) * up -> down
        for source_name, source, owner, names in pairs:
            linears = tuple(getattr(owner, n, None) for n in names)
            if getattr(source, "weight", None) is not None and all(isinstance(m, nn.Linear) for m in linears):
                found.append(SmoothGroup(f"{i}.{source_name}", source, linears))
        heads = _value_heads(model, attn)
        if heads is not None:  # attention mixes tokens, not channels: o_proj's input channel is a value channel
            found.append(SmoothGroup(f"{i}.self_attn.v_proj", attn.v_proj, (attn.o_proj,), heads))
    if not found:
        raise ValueError(f"smooth: no norm -> projection groups in {type(model).__name__} (SmoothQuant here knows "
                         "the Llama family: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up)")
    return found


def _value_heads(model: nn.Module, attn) -> torch.Tensor | None:
    """For o_proj's input channels, the v_proj output channel each reads (heads share a key/value head under
    grouped-query attention); None where the attention has no such v_proj -> o_proj pair."""
    v, o, config = getattr(attn, "v_proj", None), getattr(attn, "o_proj", None), getattr(model, "config", None)
    if not isinstance(v, nn.Linear) or not isinstance(o, nn.Linear) or config is None:
        return None
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = o.in_features // heads
    if dim * heads != o.in_features or dim * kv_heads != v.out_features or heads % kv_heads:
        return None
    channel = torch.arange(o.in_features)
    return (channel // dim) // (heads // kv_heads) * dim + channel % dim


@torch.inference_mode()
def smooth_(model: nn.Module, blocks: torch.Tensor, alpha: float | None = None) -> dict:
    """Smooth every group of ``model`` in place on the calibration ``blocks`` [n, seq_len]; ``alpha``: one value for
    every group, or None to search ``ALPHAS`` per group. Returns the alphas chosen, by group."""
    found = groups(model)
    peak = {g.name: torch.zeros(g.linears[0].in_features) for g in found}
    sample: dict[str, list[torch.Tensor]] = {g.name: [] for g in found}

    def see(name: str, x: torch.Tensor) -> None:
        peak[name] = torch.maximum(peak[name], x.abs().amax(0).cpu())
        held = sum(len(s) for s in sample[name])
        if held < SAMPLE_ROWS:
            sample[name].append(x[: SAMPLE_ROWS - held].cpu())

    layers = {g.name: g.linears[0] for g in found}  # the group's linears share their input
    calibrate.for_each_input(model, blocks, layers, see)
    chosen = {}
    for g in found:
        weights = torch.cat([m.weight.float() for m in g.linears])  # [sum of outputs, in_features]
        x = torch.cat(sample[g.name])
        w_peak, act_peak = weights.abs().amax(0), peak[g.name]
        if g.index is not None:  # one scale per source channel: the largest over the input channels reading it
            size = int(g.index.max()) + 1
            act_peak = torch.zeros(size).scatter_reduce(0, g.index, act_peak, "amax")
            w_peak = torch.zeros(size).scatter_reduce(0, g.index, w_peak, "amax")
        candidates = ALPHAS if alpha is None else (alpha,)
        errors = {a: _int8_error(x, weights, _expand(g, _scales(act_peak, w_peak, a))) for a in candidates}
        best = min(errors, key=errors.get)
        if best:
            _fold(g, _scales(act_peak, w_peak, best))
        chosen[g.name] = best
    return chosen


def _scales(act_peak: torch.Tensor, w_peak: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), 1 where a channel is silent."""
    if alpha == 0:
        return torch.ones_like(act_peak)
    s = act_peak.clamp(min=1e-5).pow(alpha) / w_peak.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(act_peak > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def _expand(g: SmoothGroup, s: torch.Tensor) -> torch.Tensor:
    """Per source channel -> per input channel of the group's linears."""
    return s if g.index is None else s[g.index]


def _int8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> float:
    """||Q_token(x / s) Q_channel(w * s)^T - x w^T||^2: what int8-dynamic's rounding costs the product."""
    xs, ws = x / s, w * s
    xq = _round8(xs, dim=1)
    wq = _round8(ws, dim=1)
    return float((xq @ wq.T - x @ w.T).pow(2).sum())


def _round8(t: torch.Tensor, dim: int) -> torch.Tensor:
    scale = t.abs().amax(dim=dim, keepdim=True).clamp(min=1e-8) / 127
    return torch.clamp(torch.round(t / scale), -127, 127) * scale


def _fold(g: SmoothGroup, s: torch.Tensor) -> None:
    """Divide the source's output channels by s (a norm's weight, a linear's rows; biases too), multiply the
    linears' input columns by s."""
    weight = g.source.weight
    weight.div_((s[:, None] if weight.dim() == 2 else s).to(weight.dtype))
    if getattr(g.source, "bias", None) is not None:
        g.source.bias.div_(s.to(g.source.bias.dtype))
    for m in g.linears:
        m.weight.mul_(_expand(g, s).to(m.weight.dtype))


@dataclass(frozen=True)
class SmoothInt8DynamicConfig:
    """``smooth-int8-dynamic``: SmoothQuant (alpha searched per group on the calibration text), then int8-dynamic.
    An artifact holds the smoothed norms as plain weights: loading restores int8-dynamic's modules only."""

    token: ClassVar[str] = "smooth-int8-dynamic"
    needs_calibration: ClassVar[bool] = True

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks: torch.Tensor | None = None) -> dict | None:
        notes = None
        if not restore:
            alphas = smooth_(model, blocks)
            counts = {str(a): sum(v == a for v in alphas.values()) for a in sorted(set(alphas.values()))}
            notes = {"groups_by_alpha": counts}  # alpha 0: left as it was
        quantize.Int8DynamicConfig().apply_(model, restore=restore)
        return notes
