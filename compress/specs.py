"""Spec strings name variants: ``"int8"``, ``"int4-g128"``, ``"prune-2:4+int8"``.

A spec is a ``+``-joined list of steps applied left to right; each step parses to one config dataclass, which
knows the rest itself: its canonical ``token``, ``apply_(model, restore=, blocks=)``, and ``needs_calibration``.
``str(parse(s)) == s`` for canonical names, so a spec string is also the variant's name. The parse table below is
the one registry: a new method adds its config class and one pattern.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress import channel_scaling, distill, gptq, mixed, prune, quantize

BASE = "base"
_GRIDS = {letter: grid for grid, letter in quantize.INT4_GRIDS.items()}

# Each step form: a pattern and the config it makes from the match.
_STEPS: list[tuple[str, Callable]] = [
    (r"(bf16|fp16)", lambda m: quantize.CastConfig(m[1])),
    (r"int8", lambda m: quantize.Int8WeightOnlyConfig()),
    (r"int8-dynamic", lambda m: quantize.Int8DynamicConfig()),
    (r"smooth-int8-dynamic", lambda m: channel_scaling.SmoothInt8DynamicConfig()),
    (r"(smooth-)?int8-dynamic-(\d+)", lambda m: mixed.DynamicMixConfig(percent=int(m[2]), smooth=bool(m[1]))),
    (r"int4([sm]?)-g(\d+)", lambda m: quantize.Int4WeightOnlyConfig(group_size=int(m[2]), grid=_GRIDS[m[1]])),
    (r"gptq-int4([sm]?)-g(\d+)", lambda m: gptq.GPTQConfig(group_size=int(m[2]), grid=_GRIDS[m[1]])),
    (r"awq-(gptq-)?int4([sm]?)-g(\d+)",
     lambda m: channel_scaling.AWQConfig(group_size=int(m[3]), grid=_GRIDS[m[2]], gptq=bool(m[1]))),
    (r"mixed(?:-int4([sm]?))?-(\d+(?:\.\d+)?)bit",
     lambda m: mixed.MixedConfig(bits=float(m[2]), grid=None if m[1] is None else _GRIDS[m[1]])),
    (r"prune-(\d+)%", lambda m: prune.MagnitudePruneConfig(sparsity=int(m[1]) / 100)),
    (r"prune-(\d+:\d+)", lambda m: prune.MagnitudePruneConfig(pattern=m[1])),
    (r"wanda-(\d+)%", lambda m: prune.WandaPruneConfig(sparsity=int(m[1]) / 100)),
    (r"wanda-(\d+:\d+)", lambda m: prune.WandaPruneConfig(pattern=m[1])),
    (r"distill-l(\d+)", lambda m: distill.DistillConfig(layers=int(m[1]))),
]


@dataclass(frozen=True)
class Spec:
    steps: tuple = ()

    def __str__(self) -> str:
        return "+".join(c.token for c in self.steps) if self.steps else BASE


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
    """The step forms as a person reads them: int4[sm]?-gN (int4-g64, int4s-g32, int4m-g128), prune-N%, ..."""
    return [BASE] + [p.replace("(", "").replace(")", "").replace("\\d+", "N") for p, _ in _STEPS]


# ---------------------------------------------------------------------------------------------------------------
# Applying a spec


def needs_calibration(spec: str | Spec) -> bool:
    return any(c.needs_calibration for c in parse(spec).steps)


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
        out = config.apply_(model, blocks=blocks)
        if isinstance(out, dict) and out:
            notes[config.token] = out
    return notes


def restore_(model, spec: str | Spec, layers: dict | None = None):
    """Give a freshly built model the module structure of ``spec`` (for loading an artifact); ``layers``: each
    layer's format, as the manifest records it for a spec that chooses per layer (mixed-Nbit, int8-dynamic-P)."""
    for config in parse(spec).steps:
        if isinstance(config, mixed.PER_LAYER):
            config = dataclasses.replace(config, layers=layers)
        config.apply_(model, restore=True)
    return model


def layer_formats(model, spec: str | Spec) -> dict | None:
    """What a manifest records for ``restore_``: each layer's format where ``spec`` chooses them per layer."""
    return mixed.module_formats(model) if any(isinstance(c, mixed.PER_LAYER) for c in parse(spec).steps) else None
