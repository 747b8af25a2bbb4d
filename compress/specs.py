"""Spec strings name variants: ``"int8"``, ``"int4-g128"``, ``"prune-2:4+int8"``.

A spec is a ``+``-joined list of steps applied left to right; each step parses to one config dataclass.
``str(parse(s)) == s`` for canonical names, so a spec string is also the variant's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from compress import quantize

BASE = "base"

# Each step form: a pattern and the config it makes from the match.
_STEPS: list[tuple[str, Callable]] = [
    (r"(bf16|fp16)", lambda m: quantize.CastConfig(m[1])),
    (r"int8", lambda m: quantize.Int8WeightOnlyConfig()),
]
# The canonical token of each config type: the inverse of _STEPS.
_TOKENS: dict[type, Callable] = {
    quantize.CastConfig: lambda c: c.dtype,
    quantize.Int8WeightOnlyConfig: lambda c: "int8",
}


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


def apply_(model, spec: str | Spec, **context):
    """Compress ``model`` in place with every step of ``spec``; returns it."""
    for config in parse(spec).steps:
        quantize.quantize_(model, config)
    return model


def restore_(model, spec: str | Spec):
    """Give a freshly built model the module structure of ``spec`` (for loading an artifact)."""
    for config in parse(spec).steps:
        quantize.restore_(model, config)
    return model
