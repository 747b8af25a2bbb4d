"""What the engine runs in one step, and the queues and cache slots it decides from.

    plan = schedule(num_decoding=3, prefilling=[("b", 700)], waiting=[("c", 40)], free_slots=4, max_batch_tokens=256)
    plan.prefill   # (("b", 253),): b's next chunk; c waits, the budget is spent

    scheduler = Scheduler(cache, max_num_seqs=16, max_batch_tokens=512)
    parts = scheduler.schedule()          # [(sequence, tokens to run)]: one per running sequence, then prompt chunks

``schedule`` is a pure function of the queues' sizes and the budgets, so it is testable without a model;
``Scheduler`` holds the queues (waiting, prefilling, decoding) and the cache slots, admits what the plan admits and
keeps the running sequences in the first slots, so that a decode step reads slots 0..n-1 as one view.

Every step decodes one token for every running sequence first (they are what users are waiting on), then spends
what is left of the token budget on prompts: first the chunks of prompts already being prefilled, then new requests
in arrival order while a slot is free. A prompt longer than the budget is prefilled in chunks over several steps, so
a long prompt delays running streams by at most one budget's worth of compute per step.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from engine.kvcache import SlotKVCache
from engine.request import Sequence


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
    prefilling: Seq[tuple[str, int]],
    waiting: Seq[tuple[str, int]],
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


class Scheduler:
    """The engine's requests by state, and the cache slots they hold.

    ``waiting`` have no slot yet (arrival order); ``prefilling`` hold a slot while their prompt goes into the cache;
    ``decoding`` generate one token a step, ``decoding[i]`` in slot i. Prompts take slots from the top and running
    sequences fill them from the bottom: a prompt that is done moves to the first slot after the running ones, and
    the last running sequence fills the hole that a finished one leaves.
    """

    def __init__(self, cache: SlotKVCache, max_num_seqs: int, max_batch_tokens: int):
        self.cache, self.max_batch_tokens = cache, max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []
        self.free_slots = set(range(max_num_seqs))

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def sequences(self) -> Iterator[Sequence]:
        """Every request the engine holds: waiting, prefilling, decoding."""
        return itertools.chain(self.waiting, self.prefilling, self.decoding)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's parts: (sequence, tokens to run), one token for every running sequence, then prompt chunks
        (admitting waiting requests into free slots as the plan says)."""
        plan = schedule(len(self.decoding), [(s.id, len(s.prompt) - s.computed) for s in self.prefilling],
                        [(s.id, len(s.prompt)) for s in self.waiting], len(self.free_slots), self.max_batch_tokens)
        for _ in plan.admit:
            seq = self.waiting.popleft()
            seq.slot = max(self.free_slots)  # prompts fill from the top; running sequences from the bottom
            self.free_slots.discard(seq.slot)
            self.prefilling.append(seq)
        by_id = {s.id: s for s in self.prefilling}
        return [(s, 1) for s in self.decoding] + [(by_id[i], n) for i, n in plan.prefill]

    @staticmethod
    def advance(parts: list[tuple[Sequence, int]]) -> list[int]:
        """The parts' tokens are in the cache now; returns the rows whose part ends a prompt or is a decode (the
        rows to sample)."""
        ready = []
        for row, (seq, n) in enumerate(parts):
            seq.computed += n
            if seq.prefilled:
                ready.append(row)
        return ready

    def start_decoding(self, seq: Sequence) -> None:
        """A prompt is done: move its cache to the first slot after the running sequences (swap with whoever is
        prefilling there), so that decode steps see slots 0..n-1 as one view."""
        self.prefilling.remove(seq)
        target = len(self.decoding)
        if seq.slot != target:
            other = next((s for s in self.prefilling if s.slot == target), None)
            if other is not None:
                self.cache.swap(seq.slot, target, seq.computed, other.computed)
                other.slot = seq.slot
            else:
                self.cache.move(seq.slot, target, seq.computed)
                self.free_slots.add(seq.slot)
                self.free_slots.discard(target)
            seq.slot = target
        self.decoding.append(seq)

    def free(self, seq: Sequence) -> None:
        """``seq`` leaves the engine (finished, cancelled or failed): its slot is free from the next step."""
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        if seq in self.decoding:
            last = self.decoding.pop()
            if last is not seq:  # the last running sequence fills the hole
                self.cache.move(last.slot, seq.slot, last.computed)
                self.decoding[seq.slot] = last
                last.slot, seq.slot = seq.slot, last.slot
        else:
            self.prefilling.remove(seq)
        self.free_slots.add(seq.slot)
        seq.slot = -1
