"""Spec strings name variants: ``"int8"``, ``"int4-g128"``, ``"prune-2:4+int8"``.

A spec is a ``+``-joined list of steps applied left to right; each step parses to one config dataclass.
``str(parse(s)) == s`` for canonical names, so a spec string is also the variant's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress import distill, gptq, prune, quantize

BASE = "base"

# Each step form: a pattern and the config it makes from the match.
_STEPS: list[tuple[str, Callable]] = [
    (r"(bf16|fp16)", lambda m: quantize.CastConfig(m[1])),
    (r"int8", lambda m: quantize.Int8WeightOnlyConfig()),
    (r"int8-dynamic", lambda m: quantize.Int8DynamicConfig()),
    (r"int4-g(\d+)", lambda m: quantize.Int4WeightOnlyConfig(group_size=int(m[1]))),
    (r"gptq-int4-g(\d+)", lambda m: gptq.GPTQConfig(group_size=int(m[1]))),
    (r"prune-(\d+)%", lambda m: prune.MagnitudePruneConfig(sparsity=int(m[1]) / 100)),
    (r"prune-(\d+:\d+)", lambda m: prune.MagnitudePruneConfig(pattern=m[1])),
    (r"wanda-(\d+)%", lambda m: prune.WandaPruneConfig(sparsity=int(m[1]) / 100)),
    (r"wanda-(\d+:\d+)", lambda m: prune.WandaPruneConfig(pattern=m[1])),
    (r"distill-l(\d+)", lambda m: distill.DistillConfig(layers=int(m[1]))),
]


def _prune_token(prefix: str) -> Callable:
    return lambda c: f"{prefix}-{c.pattern}" if c.pattern else f"{prefix}-{round(c.sparsity * 100)}%"


# The canonical token of each config type: the inverse of _STEPS.
_TOKENS: dict[type, Callable] = {
    quantize.CastConfig: lambda c: c.dtype,
    quantize.Int8WeightOnlyConfig: lambda c: "int8",
    quantize.Int8DynamicConfig: lambda c: "int8-dynamic",
    quantize.Int4WeightOnlyConfig: lambda c: f"int4-g{c.group_size}",
    gptq.GPTQConfig: lambda c: f"gptq-int4-g{c.group_size}",
    prune.MagnitudePruneConfig: _prune_token("prune"),
    prune.WandaPruneConfig: _prune_token("wanda"),
    distill.DistillConfig: lambda c: f"distill-L{c.layers}",
}

# The function that applies each config type: f(model, config, restore=..., blocks=...).
_APPLY: dict[type, Callable] = {
    quantize.CastConfig: quantize.quantize_,
    quantize.Int8WeightOnlyConfig: quantize.quantize_,
    quantize.Int8DynamicConfig: quantize.quantize_,
    quantize.Int4WeightOnlyConfig: quantize.quantize_,
    gptq.GPTQConfig: gptq.gptq_,
    prune.MagnitudePruneConfig: prune.prune_,
    prune.WandaPruneConfig: prune.prune_,
    distill.DistillConfig: distill.distill_,
}
NEEDS_CALIBRATION = (gptq.GPTQConfig, prune.WandaPruneConfig, distill.DistillConfig)


@dataclass(frozen=True)
class Spec:
    steps: tuple = ()

    def __str__(self) -> str:
        return "+".join(_token(c) for c in self.steps) if self.steps else BASE

    @property
    def is_base(self) -> bool:
        return not self.steps


def parse(spec: str | Spec) -> Spec:
    """Parse a spec string; raises ValueError naming the bad step and the known forms."""
    if isinstance(spec, Spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec {spec!r}: expected a non-empty string such as 'int8' or 'prune-2:4+int8'")
    spec = spec.strip().lower()
    if spec in (BASE, "fp32", "float32"):
        return Spec()
    steps = []
    for part in spec.split("+"):
        steps.append(_parse_step(part.strip(), spec))
    return Spec(tuple(steps))


def _parse_step(part: str, spec: str):
    for pattern, factory in _STEPS:
        m = re.fullmatch(pattern, part)
        if m:
            return factory(m)
    raise ValueError(f"spec {spec!r}: unknown step {part!r}; known forms: {', '.join(known_forms())}")


def known_forms() -> list[str]:
    return [BASE] + [p.replace("(", "").replace(")", "") for p, _ in _STEPS]


def _token(config) -> str:
    return _TOKENS[type(config)](config)


# ---------------------------------------------------------------------------------------------------------------
# Applying a spec


def needs_calibration(spec: str | Spec) -> bool:
    return any(isinstance(c, NEEDS_CALIBRATION) for c in parse(spec).steps)


def apply_(model, spec: str | Spec, *, blocks: torch.Tensor | None = None) -> dict:
    """Compress ``model`` in place with every step of ``spec``, left to right.

    Args:
        blocks: calibration token ids [n, seq_len], for the steps that look at activations (GPTQ, Wanda,
            distillation); see ``compress.data.calibration_blocks``.
    Returns:
        what the steps reported (e.g. distillation's loss before and after training), by step name.
    """
    spec = parse(spec)
    if needs_calibration(spec) and blocks is None:
        raise ValueError(f"spec {str(spec)!r} needs calibration text; pass blocks= "
                         "(see compress.data.calibration_blocks)")
    notes = {}
    for config in spec.steps:
        fn = _APPLY[type(config)]
        out = fn(model, config, blocks=blocks)
        if isinstance(out, dict) and out:
            notes[_token(config)] = out
    return notes


def restore_(model, spec: str | Spec):
    """Give a freshly built model the module structure of ``spec`` (for loading an artifact)."""
    for config in parse(spec).steps:
        _APPLY[type(config)](model, config, restore=True)
    return model
