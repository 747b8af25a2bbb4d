"""``auto`` in a sweep's specs: the smallest mixed-precision variant that meets the sweep's budget, found by measuring.

    specs: [base, int8, auto]      # with the sweep's budget, e.g. {max_ppl_increase: 0.02, min_top1_agreement: 0.95}

A ``mixed-Nbit`` variant (``compress.mixed``) stores N bits a weight on average, each layer in the format its
measured sensitivity earns it, so it gets smaller and (by the sensitivity's ranking) worse as N falls. ``auto``
bisects N between the smallest format's bits and int8's throughout (8.5, room for a few float layers), measuring each
probe against the budget as the sweep measures any variant, down to steps of 0.05 bits; the sensitivity is measured
once for all probes. The sweep's row keeps the name ``auto`` (a changed budget reruns it) and holds the variant found:
its artifact, its spec (``mixed-6.38bit``, which ``jobs.compress`` remakes) and, in its notes, every probe.
If even the top of the range misses the budget, the row is that variant, with its verdict: the closest there is.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable

from compress import evaluate, mixed, models, specs
from jobs import report

log = logging.getLogger(__name__)

AUTO = "auto"
LOW, HIGH, STEP = mixed.MIN_BITS, 8.5, 0.05


def spec_for(bits: float) -> str:
    return f"mixed-{bits:g}bit"


def search(passes: Callable[[float], bool], low: float = LOW, high: float = HIGH, step: float = STEP) -> float | None:
    """The smallest bits (within ``step``) for which ``passes(bits)``, assuming that more bits never hurt; None
    when even ``high`` fails. Probes ``high`` first, then bisects: about log2((high - low) / step) + 1 calls."""
    if not passes(high):
        return None
    if passes(low):
        return low
    while high - low > step:
        mid = round((low + high) / 2, 2)
        if mid in (low, high):
            break
        if passes(mid):
            high = mid
        else:
            low = mid
    return high


def find(base, tokenizer, kind: str, ref, blocks, budget: dict) -> tuple:
    """The smallest ``mixed-Nbit`` variant of ``base`` within ``budget``, measured against ``ref`` (the sweep's
    reference): (model, spec, notes, metrics). The notes' ``auto`` entry lists every probe and its metrics."""
    against = {"ppl": ref.ppl} if kind == models.CAUSAL else {}
    probes, kept = [], {}

    def passes(bits: float) -> bool:
        spec = spec_for(bits)
        model = copy.deepcopy(base)
        try:
            notes = specs.apply_(model, spec, blocks=blocks)
        except ValueError as e:  # fewer bits than the smallest formats need here
            probes.append({"bits": bits, "passed": False, "error": str(e)})
            return False
        metrics = evaluate.quality(model, tokenizer, kind, ref)
        missed = report.failures(metrics, against, budget)
        probes.append({"bits": bits, "passed": not missed,
                       **{k: v for k, v in sorted(metrics.items()) if isinstance(v, float)}})
        log.info("auto: %s %s", spec, "passes" if not missed else "misses " + "; ".join(missed))
        if not missed or not kept:  # the smallest passing variant so far, or the first probe (the top of the range)
            kept["found"] = (model, spec, notes, metrics)
        return not missed

    bits = search(passes)
    model, spec, notes, metrics = kept["found"]
    return model, spec, {AUTO: {"spec": spec, "found": bits is not None, "budget": budget, "probes": probes},
                         **notes}, metrics


def fingerprint(base: str, budget: dict) -> str:
    """An ``auto`` row depends on the budget as well as on what every row depends on."""
    return f"{base}-{hashlib.sha256(json.dumps(budget, sort_keys=True).encode()).hexdigest()[:8]}"
