"""Mixed precision: a format per layer, chosen from measured sensitivity under a size limit.

    specs.apply_(model, "mixed-6bit", blocks=calibration)     # MixedConfig(bits=6)

``mixed-Nbit`` gives each linear layer and embedding table the format (float, int8, int4 on any grid, in groups
that divide its rows; ``mixed-int4-Nbit``, ``mixed-int4s-Nbit``, ``mixed-int4m-Nbit`` keep int4 to one grid, for
exports that read only that one) that minimizes the predicted KL to the base (``compress.sensitivity``), with the
weights' stored bytes at most N bits per weight on average. Projections that engines fuse into one product (q/k/v,
gate/up) take one format together, so the lean forward and vLLM still stack them. The choice is a multiple-choice
knapsack, solved greedily on each unit's lower convex hull of (bytes, score): the best score drop per byte first,
which is optimal for the problem's linear relaxation and within one unit's step of it.

``int8-dynamic-P`` (``DynamicMixConfig``) chooses between two formats of the same bytes instead: int8 activations
(``int8-dynamic``, fast prefill) on at least P% of the linear layers' multiply-adds, float activations (``int8``)
where rounding them costs the most predicted KL per multiply-add: the same knapsack, with multiply-adds as the cost.

The artifact's manifest lists every layer's format (``layers``), which is all loading needs: each layer is the same
module an all-int8 or all-int4 spec makes, so the compressed-tensors and GGUF exports write a type per layer as
they do for any spec.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from compress import channel_scaling, digest, qmodules, quantize, sensitivity
from compress.sensitivity import FLOAT, INT8, INT8_DYNAMIC

log = logging.getLogger(__name__)

MIN_BITS, MAX_BITS = 4.5, 32.0
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_UNIT = "|"  # joins a unit's layer names (module names hold no "|")
_CACHE: dict = {}  # the last sensitivity table, by (weights, calibration, formats): several targets, one measurement


@dataclass(frozen=True)
class MixedConfig:
    """A format per layer with at most ``bits`` stored bits per weight on average; ``grid`` keeps int4 on one grid
    (None: any). ``layers`` is the choice, filled in by ``apply_`` and read back from a manifest for loading."""

    bits: float
    grid: str | None = None
    layers: dict | None = field(default=None, compare=False, hash=False)
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if not MIN_BITS <= self.bits < MAX_BITS:
            raise ValueError(f"MixedConfig.bits={self.bits!r}: expected {MIN_BITS:g} <= bits < {MAX_BITS:g} (the "
                             "smallest format, int4 in groups of 128 with a float32 scale and offset per group, "
                             f"stores {MIN_BITS:g} bits a weight)")
        if self.grid is not None and self.grid not in quantize.INT4_GRIDS:
            raise ValueError(f"MixedConfig.grid={self.grid!r}: expected one of {sorted(quantize.INT4_GRIDS)}")

    @property
    def token(self) -> str:
        grid = "" if self.grid is None else f"-int4{quantize.INT4_GRIDS[self.grid]}"
        return f"mixed{grid}-{self.bits:g}bit"

    @property
    def formats(self) -> tuple[str, ...]:
        letter = None if self.grid is None else quantize.INT4_GRIDS[self.grid]
        return tuple(f for f in sensitivity.FORMATS
                     if not f.startswith("int4") or letter is None or re.fullmatch(f"int4{letter}-g\\d+", f))

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks: torch.Tensor | None = None) -> dict:
        if restore:
            _restore(self, model)
            return {}
        table = _measured(model, blocks, self.formats)
        plan = solve(table, self.bits)
        swap_(model, plan)
        weights = sum(table.bytes[n][FLOAT] for n in plan) / 4
        stored = sum(table.bytes[n][f] for n, f in plan.items())
        return {"bits": round(8 * stored / weights, 3),
                "predicted_kl": float(f"{sum(table.scores[n][f] for n, f in plan.items()):.4g}"),
                "formats": counts(plan), "layers": plan,
                "sensitivity": {n: {f: float(f"{s:.4g}") for f, s in by.items()} for n, by in table.scores.items()},
                "sensitivity_tokens": table.tokens, "sensitivity_seconds": round(table.seconds, 1)}


@dataclass(frozen=True)
class DynamicMixConfig:
    """``int8-dynamic-P`` (``smooth-int8-dynamic-P``: SmoothQuant first, as ``smooth-int8-dynamic``): int8 weights
    in every layer, and int8 activations (``int8-dynamic``'s integer GEMM, its prefill speed) in the linear layers
    that do P% of those layers' multiply-adds; the rest keep float activations (``int8``). The layers left float
    are those where rounding the activations costs the most predicted KL per multiply-add (``compress.sensitivity``
    scores both formats), so a few outlier-heavy projections stop costing the whole model its quality. Embedding
    tables, and a head tied to one, are int8 either way (and not counted in P)."""

    percent: int
    smooth: bool = False
    layers: dict | None = field(default=None, compare=False, hash=False)
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if not 0 < self.percent < 100:
            raise ValueError(f"DynamicMixConfig.percent={self.percent!r}: expected 0 < percent < 100 (all of them is "
                             "int8-dynamic, none int8)")

    @property
    def token(self) -> str:
        return f"{'smooth-' if self.smooth else ''}int8-dynamic-{self.percent}"

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks: torch.Tensor | None = None) -> dict:
        if restore:
            _restore(self, model)
            return {}
        notes = {}
        if self.smooth:
            notes["groups_by_alpha"] = channel_scaling.counts(channel_scaling.smooth_(model, blocks))
        table = _measured(model, blocks, (INT8, INT8_DYNAMIC))
        macs = {name: mod.in_features * mod.out_features for name, mod in sensitivity.layers(model).items()
                if isinstance(mod, nn.Linear)}
        plan = solve_dynamic(table, self.percent / 100, macs)
        swap_(model, plan)
        dynamic = sum(macs[n] for n, f in plan.items() if f == INT8_DYNAMIC)
        able = sum(macs[n] for n in table.scores if INT8_DYNAMIC in table.scores[n])
        return {**notes, "dynamic_share": round(dynamic / able, 4),
                "predicted_kl": float(f"{sum(table.scores[n][f] for n, f in plan.items()):.4g}"),
                "formats": counts(plan), "layers": plan,
                "sensitivity": {n: {f: float(f"{s:.4g}") for f, s in by.items()} for n, by in table.scores.items()},
                "sensitivity_tokens": table.tokens, "sensitivity_seconds": round(table.seconds, 1)}


PER_LAYER = (MixedConfig, DynamicMixConfig)  # the configs whose artifacts record a format per layer


def _restore(config, model: nn.Module) -> None:
    if not config.layers:
        raise ValueError(f"{config.token}: loading needs each layer's format (the manifest's 'layers')")
    swap_(model, config.layers, restore=True)


def _measured(model: nn.Module, blocks: torch.Tensor, formats: tuple[str, ...]) -> sensitivity.Table:
    key = (digest.weight_digest(model), hash(blocks.numpy().tobytes()), formats)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = sensitivity.measure(model, blocks, formats)
    return _CACHE[key]


def units(names) -> list[tuple[str, ...]]:
    """The layers that must share a format: the projections an engine runs as one product (q/k/v, gate/up: raypress's
    lean forward and vLLM's fused layers stack them, which needs one format) together, every other layer alone."""
    groups: dict = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        key = next(((parent, i) for i, fused in enumerate(FUSED) if leaf in fused), name)
        groups.setdefault(key, []).append(name)
    return [tuple(group) for group in groups.values()]


def _tied(table: sensitivity.Table) -> sensitivity.Table:
    """``table`` over ``units``: a unit's score and bytes in a format are its layers' sums, for the formats all take."""
    out = sensitivity.Table(tokens=table.tokens, seconds=table.seconds)
    for unit in units(table.scores):
        scored = [f for f in table.scores[unit[0]] if all(f in table.scores[n] for n in unit)]
        sized = [f for f in table.bytes[unit[0]] if all(f in table.bytes[n] for n in unit)]
        out.scores[_UNIT.join(unit)] = {f: sum(table.scores[n][f] for n in unit) for f in scored}
        out.bytes[_UNIT.join(unit)] = {f: sum(table.bytes[n][f] for n in unit) for f in sized}
    return out


def solve(table: sensitivity.Table, bits: float) -> dict[str, str]:
    """The format per layer with the least total score whose stored bytes are at most ``bits`` per weight; the
    layers of a fused product (``units``) take one format."""
    plan = _solve(_tied(table), bits)
    return {name: fmt for unit, fmt in plan.items() for name in unit.split(_UNIT)}


def solve_dynamic(table: sensitivity.Table, share: float, macs: dict[str, int]) -> dict[str, str]:
    """int8-dynamic or int8 per layer (fused units together): the least total score with int8-dynamic on at least
    ``share`` of the multiply-adds (``macs``) of the layers that can take it."""
    tied = _tied(table)
    cost = sensitivity.Table(scores=tied.scores, tokens=tied.tokens, seconds=tied.seconds)
    for unit, scores in tied.scores.items():
        unit_macs = sum(macs.get(n, 0) for n in unit.split(_UNIT))
        cost.bytes[unit] = {f: unit_macs if f == INT8 and INT8_DYNAMIC in scores else 0 for f in scores}
    able = sum(b[INT8] for b in cost.bytes.values())
    plan = _pick(cost, (1 - share) * able)
    return {name: fmt for unit, fmt in plan.items() for name in unit.split(_UNIT)}


def _solve(table: sensitivity.Table, bits: float) -> dict[str, str]:
    weights = sum(b[FLOAT] for b in table.bytes.values()) / 4
    try:
        return _pick(table, bits * weights / 8)
    except ValueError as e:
        raise ValueError(f"mixed-{bits:g}bit: even the smallest formats store {8 * e.args[1] / weights:.2f} bits a "
                         "weight here; ask for more bits") from None


def _pick(table: sensitivity.Table, budget: float) -> dict[str, str]:
    """The format per unit with the least total score whose costs (``table.bytes``) add up to at most ``budget``:
    greedily, the best score saved per unit of cost first, on each unit's lower convex hull. Raises
    ValueError(message, least cost) when even the cheapest formats cost more."""
    hulls = {name: _hull(table.bytes[name], table.scores[name]) for name in table.scores}
    plan = {name: hull[0][2] for name, hull in hulls.items()}
    used = sum(hull[0][0] for hull in hulls.values())
    if used > budget:
        raise ValueError("the cheapest formats cost more than the budget", used)
    steps = []  # (score saved per unit of cost, unit, position on its hull)
    for name, hull in hulls.items():
        for i in range(1, len(hull)):
            (b0, s0, _), (b1, s1, _) = hull[i - 1], hull[i]
            steps.append(((s0 - s1) / (b1 - b0), name, i))
    blocked = set()
    for _, name, i in sorted(steps, key=lambda s: -s[0]):
        if name in blocked:
            continue
        hull = hulls[name]
        extra = hull[i][0] - hull[i - 1][0]
        if used + extra > budget:
            blocked.add(name)  # its later steps cost more per score saved; smaller steps elsewhere may still fit
            continue
        used += extra
        plan[name] = hull[i][2]
    return plan


def _hull(bytes_: dict[str, int], scores: dict[str, float]) -> list[tuple[int, float, str]]:
    """A layer's formats on the lower convex hull of (bytes, score), smallest first: each step up buys less score
    per byte than the one before, and no format is beaten by a smaller one."""
    points = sorted(((bytes_[f], scores[f], f) for f in scores), key=lambda p: (p[0], p[1]))
    hull: list[tuple[int, float, str]] = []
    for p in points:
        if hull and p[1] >= hull[-1][1]:
            continue  # no better than a smaller format
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def swap_(model: nn.Module, plan: dict[str, str], *, restore: bool = False) -> None:
    """Give each layer named in ``plan`` its format, as the whole-model config of that format would."""
    makers = {fmt: sensitivity.format_config(fmt).makers(restore) for fmt in set(plan.values()) if fmt != FLOAT}
    pick = lambda i: lambda mod, name: (makers[plan[name]][i](mod, name)  # noqa: E731
                                        if plan.get(name, FLOAT) != FLOAT else None)
    quantize.swap_modules_(model, pick(0), pick(1))


def module_formats(model: nn.Module) -> dict[str, str]:
    """Each layer's format as it stands (what a manifest records for loading): "float", "int8", "int8-dynamic" or
    "int4[sm]-gN", the int4 grid read from the stored offsets. A tied head is left out: it is the table's view."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = {}
    for name, mod in model.named_modules():
        if mod is head and table is not None and _shares(head, table):
            continue
        if isinstance(mod, qmodules.Int8DynamicLinear):
            out[name] = "int8-dynamic"
        elif isinstance(mod, qmodules.Int8WeightOnlyLinear | qmodules.Int8Embedding):
            out[name] = INT8
        elif isinstance(mod, qmodules.Int4WeightOnlyLinear | qmodules.Int4Embedding):
            out[name] = f"int4{quantize.INT4_GRIDS[_grid(mod)]}-g{mod.group_size}"
        elif isinstance(mod, nn.Linear | nn.Embedding):
            out[name] = FLOAT
    return out


def _shares(head: nn.Module, table: nn.Module) -> bool:
    """Whether the output head is the input table's tensors (tied), float or quantized."""
    if isinstance(head, nn.Linear) and isinstance(table, nn.Embedding):
        return head.weight is table.weight
    return getattr(head, "scale", None) is not None and getattr(head, "scale", None) is getattr(table, "scale", None)


def _grid(mod: nn.Module) -> str:
    if qmodules.is_symmetric(mod.scale, mod.offset):
        return "symmetric"
    return "zero_point" if qmodules.zero_points(mod.scale, mod.offset) is not None else "min"


def counts(plan: dict[str, str]) -> dict[str, int]:
    """How many layers take each format."""
    out: dict[str, int] = {}
    for fmt in plan.values():
        out[fmt] = out.get(fmt, 0) + 1
    return dict(sorted(out.items()))
