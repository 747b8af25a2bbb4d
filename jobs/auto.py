"""``auto`` in a sweep's specs: the smallest mixed-precision variant that meets the sweep's budget, found by measuring;
``auto-dynamic``: the ``int8-dynamic-P`` variant with int8 activations (fast prefill) on the most multiply-adds.

    specs: [base, int8, auto, auto-dynamic]   # with the sweep's budget, e.g. {max_ppl_increase: 0.02, ...}

A ``mixed-Nbit`` variant (``compress.mixed``) stores N bits a weight on average, each layer in the format its
measured sensitivity earns it, so it gets smaller and (by the sensitivity's ranking) worse as N falls. ``auto``
bisects N between the smallest format's bits and int8's throughout (8.5, room for a few float layers), measuring each
probe against the budget as the sweep measures any variant, down to steps of 0.05 bits; the sensitivity is measured
once for all probes. The sweep's row keeps the name ``auto`` (a changed budget reruns it) and holds the variant found:
its artifact, its spec (``mixed-6.38bit``, which ``jobs.compress`` remakes) and, in its notes, every probe.
If even the top of the range misses the budget, the row is that variant, with its verdict: the closest there is.

``auto-dynamic`` searches the same way over the share of multiply-adds left on float activations, from 1% to 50% in
steps of 1 (``smooth-int8-dynamic-P`` with P = 100 - share for the Llama family, which SmoothQuant knows, smoothed
once for every probe; ``int8-dynamic-P`` otherwise): the fewest float-activation layers that keep the budget, so
the most prefill speed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from compress import channel_scaling, evaluate, mixed, models, specs
from jobs import report

log = logging.getLogger(__name__)

AUTO, AUTO_DYNAMIC = "auto", "auto-dynamic"
LOW, HIGH, STEP = mixed.MIN_BITS, 8.5, 0.05


def _mixed(bits: float) -> str:
    return f"mixed-{bits:g}bit"


def _dynamic(float_percent: float) -> str:
    return f"int8-dynamic-{100 - round(float_percent)}"


@dataclass(frozen=True)
class Family:
    """Variants ordered by one number x, more of which never hurts quality: ``spec(x)`` names one."""

    key: str  # what x is, in a probe's record
    spec: Callable[[float], str]
    low: float
    high: float
    step: float
    digits: int  # x is rounded to this many decimals
    smooth: bool = False  # SmoothQuant first where the architecture takes it: once, for every probe ("smooth-" spec)


FAMILIES = {AUTO: Family("bits", _mixed, LOW, HIGH, STEP, 2),
            AUTO_DYNAMIC: Family("float_activation_percent", _dynamic, 1, 50, 1, 0, smooth=True)}


def search(passes: Callable[[float], bool], low: float = LOW, high: float = HIGH, step: float = STEP,
           digits: int = 2) -> float | None:
    """The smallest x (within ``step``) for which ``passes(x)``, assuming that a larger x never hurts; None when
    even ``high`` fails. Probes ``high`` first, then bisects: about log2((high - low) / step) + 1 calls."""
    if not passes(high):
        return None
    if passes(low):
        return low
    while high - low > step:
        mid = round((low + high) / 2, digits)
        if mid in (low, high):
            break
        if passes(mid):
            high = mid
        else:
            low = mid
    return high


def find(base, tokenizer, kind: str, ref, blocks, budget: dict, name: str = AUTO) -> tuple:
    """The variant of family ``name`` (``FAMILIES``) with the least x within ``budget``, measured against ``ref``
    (the sweep's reference): (model, spec, notes, metrics). The notes' ``name`` entry lists every probe."""
    family = FAMILIES[name]
    against = {"ppl": ref.ppl} if kind == models.CAUSAL else {}
    probes, kept = [], {}
    start, smoothing = _smoothed(base, blocks) if family.smooth else (base, None)

    def passes(x: float) -> bool:
        made = family.spec(x)
        spec = made if smoothing is None else f"smooth-{made}"  # what jobs.compress remakes in one go
        model = copy.deepcopy(start)
        try:
            notes = specs.apply_(model, made, blocks=blocks)
            if smoothing is not None:
                notes = {spec: {**smoothing, **notes.get(made, {})}}
        except ValueError as e:  # e.g. fewer bits than the smallest formats need here
            probes.append({family.key: x, "spec": spec, "passed": False, "error": str(e)})
            return False
        metrics = evaluate.quality(model, tokenizer, kind, ref)
        missed = report.failures(metrics, against, budget)
        probes.append({family.key: x, "spec": spec, "passed": not missed,
                       **{k: v for k, v in sorted(metrics.items()) if isinstance(v, float)}})
        log.info("%s: %s %s", name, spec, "passes" if not missed else "misses " + "; ".join(missed))
        if not missed or not kept:  # the smallest passing variant so far, or the first probe (the top of the range)
            kept["found"] = (model, spec, notes, metrics)
        return not missed

    x = search(passes, family.low, family.high, family.step, family.digits)
    model, spec, notes, metrics = kept["found"]
    return model, spec, {name: {"spec": spec, "found": x is not None, "budget": budget, "probes": probes},
                         **notes}, metrics


def _smoothed(base, blocks) -> tuple:
    """``base`` after SmoothQuant (a copy) and what it chose, or ``base`` and None outside the Llama family."""
    try:
        channel_scaling.groups(base)
    except ValueError:
        return base, None
    model = copy.deepcopy(base)
    return model, {"groups_by_alpha": channel_scaling.counts(channel_scaling.smooth_(model, blocks))}


def fingerprint(base: str, budget: dict) -> str:
    """An ``auto`` (``auto-dynamic``) row depends on the budget as well as on what every row depends on."""
    return f"{base}-{hashlib.sha256(json.dumps(budget, sort_keys=True).encode()).hexdigest()[:8]}"
