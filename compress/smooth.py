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
``post_attention_layernorm`` -> gate, up projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compress import calibrate, quantize

ALPHAS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SAMPLE_ROWS = 1024  # calibration tokens per group the search compares products on


@dataclass(frozen=True)
class SmoothGroup:
    name: str
    norm: nn.Module
    linears: tuple[nn.Linear, ...]


def groups(model: nn.Module) -> list[SmoothGroup]:
    """The (norm -> linears) pairs of the model's blocks; ValueError for an architecture with none."""
    stack = calibrate.transformer_blocks(model)
    found = []
    for i, block in enumerate(stack if stack is not None else []):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        pairs = [("input_layernorm", attn, ("q_proj", "k_proj", "v_proj")),
                 ("post_attention_layernorm", mlp, ("gate_proj", "up_proj"))]
        for norm_name, owner, names in pairs:
            norm = getattr(block, norm_name, None)
            linears = tuple(getattr(owner, n, None) for n in names)
            if norm is not None and getattr(norm, "weight", None) is not None and all(
                    isinstance(m, nn.Linear) for m in linears):
                found.append(SmoothGroup(f"{i}.{norm_name}", norm, linears))
    if not found:
        raise ValueError(f"smooth: no norm -> projection groups in {type(model).__name__} (SmoothQuant here knows "
                         "the Llama family: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up)")
    return found


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
        candidates = ALPHAS if alpha is None else (alpha,)
        errors = {a: _int8_error(x, weights, _scales(peak[g.name], weights, a)) for a in candidates}
        best = min(errors, key=errors.get)
        if best:
            _fold(g, _scales(peak[g.name], weights, best))
        chosen[g.name] = best
    return chosen


def _scales(act_peak: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), 1 where a channel is silent."""
    if alpha == 0:
        return torch.ones_like(act_peak)
    w_peak = weights.abs().amax(0).clamp(min=1e-5)
    s = act_peak.clamp(min=1e-5).pow(alpha) / w_peak.pow(1 - alpha)
    return torch.where(act_peak > 0, s, torch.ones_like(s)).clamp(min=1e-5)


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
    """Divide the norm's output channels by s, multiply the linears' input columns by s."""
    g.norm.weight.div_(s.to(g.norm.weight.dtype))
    if getattr(g.norm, "bias", None) is not None:
        g.norm.bias.div_(s.to(g.norm.bias.dtype))
    for m in g.linears:
        m.weight.mul_(s.to(m.weight.dtype))


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
