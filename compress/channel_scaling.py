"""Scale input channels before quantizing: SmoothQuant (int8 activations) and AWQ (int4 weights).

    smooth_(model, blocks)                  # SmoothQuant in place; the float model computes what it did
    awq_(model, blocks, group_size, grid)   # AWQ in place, for the int4 grid that follows
    SmoothInt8DynamicConfig()               # spec "smooth-int8-dynamic": smooth_, then int8-dynamic
    AWQConfig(group_size=128)               # spec "awq-int4-g128" (also awq-int4s-gN, awq-gptq-int4-gN)

Dividing input channel j of a group of linear layers by s_j and multiplying column j of their weights by s_j leaves
their product unchanged; the division is folded into whatever makes the channel (a norm's weight and bias, the rows
of a linear layer), so the scaled model runs the same ops as before. What s is for:
- SmoothQuant: per-token int8 rounds a whole token on one grid, so a few channels far larger than the rest leave the
  others a handful of levels. s_j = max|X_j|^a / max|W_j|^(1 - a) evens the channels out, moving the outliers into
  the weights (which int8 rounds per output channel).
- AWQ: int4 rounds weights in small groups; the columns that meet large activations matter most. s_j = mean|X_j|^a
  (normalized) enlarges those columns before rounding, so their relative rounding error shrinks.
a is searched per group on the calibration text: the value whose quantized product (as the format that follows
rounds it) is closest to the float product, a = 0 (left alone) among the candidates.

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

from compress import calibrate, gptq, kernels, qmodules, quantize

ALPHAS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # SmoothQuant's
AWQ_ALPHAS = tuple(i / 10 for i in range(10))  # AWQ's: 0 to 0.9
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
        raise ValueError(f"channel scaling: no norm -> projection groups in {type(model).__name__} (SmoothQuant and "
                         "AWQ here know the Llama family: input_layernorm -> q/k/v, post_attention_layernorm -> "
                         "gate/up)")
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


@dataclass(frozen=True)
class Method:
    """What one channel-scaling method measures and searches: ``stat`` of |X| per channel (max or mean over the
    calibration tokens), ``scales(act, w_peak, a)``, and the ``error`` of a quantized product x @ w.T with x / s and
    w * s."""

    stat: str  # "amax" | "mean"
    scales: object
    error: object
    alphas: tuple


def smooth_(model: nn.Module, blocks: torch.Tensor, alpha: float | None = None) -> dict:
    """SmoothQuant every group of ``model`` in place on the calibration ``blocks`` [n, seq_len]; ``alpha``: one value
    for every group, or None to search ``ALPHAS`` per group. Returns the alphas chosen, by group."""
    method = Method("amax", _smooth_scales, _int8_error, ALPHAS if alpha is None else (alpha,))
    return scale_(model, blocks, method)


def awq_(model: nn.Module, blocks: torch.Tensor, group_size: int, grid: str = "zero_point") -> dict:
    """AWQ every group of ``model`` in place for int4 groups of ``group_size`` on ``grid``; returns the alphas."""

    def error(x, w, s):
        q, scale, offset = qmodules.quantize_groupwise(w * s, group_size, 4, grid)
        wq = kernels.dequantize_groupwise(q, scale, offset, group_size)
        return float(((x / s) @ wq.T - x @ w.T).pow(2).sum())

    return scale_(model, blocks, Method("mean", _awq_scales, error, AWQ_ALPHAS))


@torch.inference_mode()
def scale_(model: nn.Module, blocks: torch.Tensor, method: Method) -> dict:
    """Scale every group of ``model`` in place as ``method`` searches on the calibration ``blocks``."""
    found = groups(model)
    stat = {g.name: torch.zeros(g.linears[0].in_features) for g in found}
    tokens = dict.fromkeys(stat, 0)
    sample: dict[str, list[torch.Tensor]] = {g.name: [] for g in found}

    def see(name: str, x: torch.Tensor) -> None:
        a = x.abs()
        stat[name] = torch.maximum(stat[name], a.amax(0).cpu()) if method.stat == "amax" else stat[name] + a.sum(0)
        tokens[name] += len(x)
        held = sum(len(s) for s in sample[name])
        if held < SAMPLE_ROWS:
            sample[name].append(x[: SAMPLE_ROWS - held].cpu())

    layers = {g.name: g.linears[0] for g in found}  # the group's linears share their input
    calibrate.for_each_input(model, blocks, layers, see)
    chosen = {}
    for g in found:
        weights = torch.cat([m.weight.float() for m in g.linears])  # [sum of outputs, in_features]
        x = torch.cat(sample[g.name])
        act = stat[g.name] if method.stat == "amax" else stat[g.name] / max(tokens[g.name], 1)
        w_peak = weights.abs().amax(0)
        if g.index is not None:  # one scale per source channel: the largest over the input channels reading it
            size = int(g.index.max()) + 1
            act = torch.zeros(size).scatter_reduce(0, g.index, act, "amax")
            w_peak = torch.zeros(size).scatter_reduce(0, g.index, w_peak, "amax")
        errors = {a: method.error(x, weights, _expand(g, method.scales(act, w_peak, a))) for a in method.alphas}
        best = min(errors, key=errors.get)
        if best:
            _fold(g, method.scales(act, w_peak, best))
        chosen[g.name] = best
    return chosen


def _smooth_scales(act_peak: torch.Tensor, w_peak: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), 1 where a channel is silent."""
    if alpha == 0:
        return torch.ones_like(act_peak)
    s = act_peak.clamp(min=1e-5).pow(alpha) / w_peak.clamp(min=1e-5).pow(1 - alpha)
    return torch.where(act_peak > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def _awq_scales(act_mean: torch.Tensor, w_peak: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's s_j = mean|X_j|^alpha, divided by sqrt(max s * min s) so that the scales centre on 1."""
    if alpha == 0:
        return torch.ones_like(act_mean)
    s = act_mean.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


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
            notes = {"groups_by_alpha": counts(smooth_(model, blocks))}
        quantize.Int8DynamicConfig().apply_(model, restore=restore)
        return notes


@dataclass(frozen=True)
class AWQConfig:
    """``awq-int4-gN`` (``awq-int4s-gN`` symmetric, ``awq-gptq-int4-gN`` with GPTQ's rounding after the scaling):
    activation-aware scales searched per group on the calibration text for the int4 grid that follows, then int4.
    An artifact holds the scaled norms and rows as plain weights: loading restores the int4 modules only."""

    group_size: int = 128
    grid: str = "zero_point"
    gptq: bool = False
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        quantize.check_int4(type(self).__name__, self.group_size, self.grid)

    @property
    def token(self) -> str:
        return f"awq-{'gptq-' if self.gptq else ''}int4{quantize.INT4_GRIDS[self.grid]}-g{self.group_size}"

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks: torch.Tensor | None = None) -> dict | None:
        notes = None
        if not restore:
            notes = {"groups_by_alpha": counts(awq_(model, blocks, self.group_size, self.grid))}
        if self.gptq:
            gptq.GPTQConfig(group_size=self.group_size, grid=self.grid).apply_(model, restore=restore, blocks=blocks)
        else:
            quantize.Int4WeightOnlyConfig(self.group_size, self.grid).apply_(model, restore=restore)
        return notes


def counts(alphas: dict) -> dict[str, int]:
    """How many groups took each alpha (0: left as they were)."""
    return {str(a): sum(v == a for v in alphas.values()) for a in sorted(set(alphas.values()))}
