"""Pruning: zero weights of the linear layers inside the model's blocks.

    prune_(model, MagnitudePruneConfig(sparsity=0.5))          # unstructured: smallest |W| per layer
    prune_(model, MagnitudePruneConfig(pattern="2:4"))         # semi-structured: 2 of every 4 along the input
    prune_(model, WandaPruneConfig(sparsity=0.5), blocks=...)  # |W| x ||X_j||, compared within each output row

The weights stay dense in memory; an artifact stores mostly-zero tensors as a bit mask plus the non-zero values, so
pruning shrinks the bytes on disk. On GPUs with sparse tensor cores (compute capability 8.0+), ``semi_structured_``
hands 2:4-sparse fp16/bf16 weights to torch's semi-structured sparse kernels; artifacts do this when they load.
Wanda (Sun et al., 2023) scores each weight by its magnitude times the norm of its input channel over calibration
text, so channels that carry large activations keep their weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compress import calibrate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _PruneConfig:
    sparsity: float = 0.5  # fraction of weights zeroed (unstructured), ignored with a pattern
    pattern: str | None = None  # "N:M": keep N of every M consecutive input weights
    prefix: ClassVar[str] = ""

    def __post_init__(self):
        _check(type(self).__name__, self.sparsity, self.pattern)

    @property
    def token(self) -> str:
        return f"{self.prefix}-{self.pattern}" if self.pattern else f"{self.prefix}-{round(self.sparsity * 100)}%"

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks: torch.Tensor | None = None) -> None:
        prune_(model, self, restore=restore, blocks=blocks)


@dataclass(frozen=True)
class MagnitudePruneConfig(_PruneConfig):
    """Scores |w|, compared within each layer."""

    needs_calibration: ClassVar[bool] = False
    prefix: ClassVar[str] = "prune"


@dataclass(frozen=True)
class WandaPruneConfig(_PruneConfig):
    """Scores |w| x ||x|| (weight times input norm over calibration text), compared within each output row."""

    needs_calibration: ClassVar[bool] = True
    prefix: ClassVar[str] = "wanda"


def _check(cls: str, sparsity: float, pattern: str | None) -> None:
    if pattern is not None:
        n, _, m = pattern.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"{cls}.pattern={pattern!r}: expected 'N:M' with 0 < N < M, such as '2:4'")
    elif not 0.0 < sparsity < 1.0:
        raise ValueError(f"{cls}.sparsity={sparsity!r}: expected a fraction in (0, 1)")


def prune_mask(score: torch.Tensor, sparsity: float, pattern: str | None, per_row: bool) -> torch.Tensor:
    """Boolean keep-mask [N, K] that drops the lowest scores: N:M groups, per output row, or per whole matrix."""
    N, K = score.shape
    if pattern is not None:
        n, m = (int(v) for v in pattern.split(":"))
        if K % m:
            raise ValueError(f"{pattern} pruning needs in_features divisible by {m}, got {K}")
        groups = score.reshape(N, K // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.reshape(N, K)
    if per_row:
        drop = int(K * sparsity)
        idx = score.argsort(dim=1)[:, :drop]
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, idx, False)
    drop = int(score.numel() * sparsity)
    threshold = score.reshape(-1).kthvalue(max(drop, 1)).values
    return score > threshold


@torch.no_grad()
def prune_(model: nn.Module, config, *, restore: bool = False, blocks: torch.Tensor | None = None) -> nn.Module:
    """Zero weights in place as ``config`` says; returns the model. ``restore`` is a no-op (weights stay dense)."""
    if restore:
        return model
    layers = calibrate.block_linears(model)
    if not layers:
        raise ValueError(f"nothing to prune in {type(model).__name__}: it has no linear layers inside its blocks")
    wanda = isinstance(config, WandaPruneConfig)
    if wanda:
        if blocks is None:
            raise ValueError("Wanda pruning needs calibration text (blocks=)")
        norms = calibrate.input_norms(model, blocks, layers)
    pruned = 0
    for name, layer in layers.items():
        w = layer.weight
        if config.pattern and w.shape[1] % int(config.pattern.split(":")[1]):
            log.info("skip %s %s: in_features not divisible for %s", name, tuple(w.shape), config.pattern)
            continue
        score = w.abs().float() * (norms[name].to(w.device)[None, :] if wanda else 1.0)
        w.mul_(prune_mask(score, config.sparsity, config.pattern, per_row=wanda).to(w.dtype))
        pruned += 1
    if pruned == 0:
        raise ValueError(f"no layer of {type(model).__name__} could be pruned with {config}")
    return model


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the linear layers inside the blocks."""
    layers = calibrate.block_linears(model).values()
    zeros = sum((m.weight == 0).sum().item() for m in layers)
    return zeros / max(sum(m.weight.numel() for m in layers), 1)


def is_2to4(w: torch.Tensor) -> bool:
    """True when every group of 4 consecutive input weights of w [N, K] holds at most 2 non-zeros."""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


# torch's minimum sparse shape (rows, cols) per dtype for its semi-structured kernels (CUTLASS; cuSPARSELt needs less)
_SEMI_STRUCTURED_MIN = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}


def semi_structured_(model: nn.Module) -> int:
    """Give every 2:4-sparse fp16/bf16 ``nn.Linear`` weight on a GPU with sparse tensor cores to torch's
    semi-structured sparse kernels (``torch.sparse.to_sparse_semi_structured``); returns how many layers took it.

    For inference: the converted weights are read-only. Layers that do not qualify (not 2:4, another dtype, a shape
    the kernels do not take) stay dense; nothing happens on CPUs or older GPUs, and the log says why.
    """
    candidates = [(n, m) for n, m in calibrate.block_linears(model).items() if is_2to4(m.weight)]
    if not candidates:
        return 0
    device = candidates[0][1].weight.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        log.info("2:4 sparse weights stay dense: sparse tensor cores need a CUDA GPU of compute capability 8.0+")
        return 0
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for name, layer in candidates:
        w = layer.weight
        rows, cols = _SEMI_STRUCTURED_MIN.get(w.dtype, (0, 0))
        if not rows or w.shape[0] % rows or w.shape[1] % cols:
            log.info("%s %s %s stays dense: the sparse kernels take fp16/bf16 in multiples of 32 x 64",
                     name, tuple(w.shape), w.dtype)
            continue
        dense = w.detach().contiguous()
        try:
            sparse = to_sparse_semi_structured(dense)
            x = torch.randn(8, dense.shape[1], device=device, dtype=dense.dtype)
            agree = torch.allclose(F.linear(x, sparse), F.linear(x, dense), rtol=2e-2, atol=2e-2)
        except (RuntimeError, ValueError) as e:  # a torch build without the kernels: stay dense, say why once
            log.warning("2:4 sparse kernels unavailable (%s); weights stay dense", e)
            return converted
        if not agree:
            log.warning("%s: the sparse kernel disagrees with the dense product; it stays dense", name)
            continue
        layer.weight = nn.Parameter(sparse, requires_grad=False)
        converted += 1
    log.info("2:4 sparse kernels: %d of %d layers", converted, len(candidates))
    return converted
