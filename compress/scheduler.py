"""What the engine runs in one step: a pure function of its queues and budgets, so it is testable without a model.

    plan = schedule(num_decoding=3, prefilling=[("b", 700)], waiting=[("c", 40)], free_slots=4, max_batch_tokens=256)
    plan.prefill   # (("b", 253),): b's next chunk; c waits, the budget is spent

Every step decodes one token for every running sequence first (they are what users are waiting on), then spends
what is left of the token budget on prompts: first the chunks of prompts already being prefilled, then new requests
in arrival order while a slot is free. A prompt longer than the budget is prefilled in chunks over several steps, so
a long prompt delays running streams by at most one budget's worth of compute per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    num_decoding: int  # running sequences that decode one token each
    prefill: tuple[tuple[str, int], ...]  # (request id, prompt tokens to run this step), in order
    admit: tuple[str, ...]  # waiting requests that get a slot this step (their first chunk is in ``prefill``)

    @property
    def num_tokens(self) -> int:
        return self.num_decoding + sum(n for _, n in self.prefill)


def schedule(
    num_decoding: int,
    prefilling: Sequence[tuple[str, int]],
    waiting: Sequence[tuple[str, int]],
    free_slots: int,
    max_batch_tokens: int,
) -> Plan:
    """Plan one step.

    Args:
        num_decoding: sequences past their prompt; each takes one token of the budget.
        prefilling: (request id, prompt tokens not yet in the cache) of admitted requests, oldest first.
        waiting: (request id, prompt tokens) of requests without a slot, in arrival order.
        free_slots: cache slots not held by any request.
        max_batch_tokens: tokens one step may run (decode tokens plus prompt chunks).
    """
    budget = max_batch_tokens - num_decoding
    prefill: list[tuple[str, int]] = []
    for request_id, remaining in prefilling:
        if budget <= 0:
            break
        n = min(remaining, budget)
        prefill.append((request_id, n))
        budget -= n
    admit: list[str] = []
    for request_id, prompt_tokens in waiting:
        if budget <= 0 or free_slots <= 0:
            break
        n = min(prompt_tokens, budget)
        prefill.append((request_id, n))
        admit.append(request_id)
        budget -= n
        free_slots -= 1
    return Plan(num_decoding, tuple(prefill), tuple(admit))
