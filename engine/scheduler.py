"""What the engine runs each step, and the KV blocks each request holds while it runs.

    scheduler = Scheduler(BlockPool(num_blocks=2048, block_size=16), max_num_seqs=16, max_batch_tokens=512)
    scheduler.add(seq)
    step = scheduler.schedule()      # step.parts: [(sequence, tokens to run)], the step.num_decode decodes first
    ready = scheduler.advance(step.parts)   # after the forward: the rows to sample

Every step runs one token for each running sequence that is one token behind (a decode: what users are waiting
on), then spends what is left of the token budget (``max_batch_tokens``) on prompt chunks: first those of requests
already running, oldest first, then new requests in arrival order while fewer than ``max_num_seqs`` run. A prompt
longer than the budget is prefilled over several steps, so it delays running streams by at most one budget's worth
of compute per step.

Memory is the pool's blocks (engine.blocks): a request holds the blocks its tokens fill, taken as its chunks need
them. A new request first looks up the longest cached prefix of its prompt (full blocks whose digests match) and
starts after it; it is admitted only while blocks remain for its first chunk (and a small reserve for the running
sequences' next tokens), otherwise it waits, first in line. When a running sequence needs a block and none is free,
the newest running request is preempted: its blocks go back (its full ones stay cached) and it waits at the front of
the queue, to be recomputed from its tokens, prompt and output, when blocks free up; its text so far is kept. The
scheduler needs no model: its tests run on the pool alone.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from engine.blocks import BlockPool
from engine.request import Sequence


@dataclass(frozen=True)
class Step:
    """One step's work: (sequence, tokens) parts, the first ``num_decode`` of them one token each."""

    parts: list[tuple[Sequence, int]]
    num_decode: int

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.parts)


class Scheduler:
    """The engine's requests (``waiting`` in arrival order, ``running`` in admission order) and their blocks."""

    def __init__(self, pool: BlockPool, max_num_seqs: int, max_batch_tokens: int):
        if max_num_seqs < 1 or max_batch_tokens <= max_num_seqs:
            raise ValueError(f"max_num_seqs={max_num_seqs}, max_batch_tokens={max_batch_tokens}: expected "
                             "max_num_seqs >= 1 and max_batch_tokens > max_num_seqs (each running sequence takes a "
                             "token of every step)")
        self.pool, self.max_num_seqs, self.max_batch_tokens = pool, max_num_seqs, max_batch_tokens
        self.reserve = max(1, pool.num_blocks // 100)  # kept free at admission, for the running sequences' growth
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prompt_tokens = self.cached_tokens = 0  # first admissions: prompt tokens, and those found cached

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_prefilling(self) -> int:
        """Requests whose prompt is not all in the cache yet (waiting ones included)."""
        return len(self.waiting) + sum(s.computed < len(s.prompt) for s in self.running)

    def sequences(self) -> Iterator[Sequence]:
        """Every request the engine holds: waiting, then running."""
        return itertools.chain(self.waiting, self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # -- one step -------------------------------------------------------------------------------------------------

    def schedule(self) -> Step:
        """This step's parts: a token for every sequence one behind, then prompt chunks, then new requests."""
        behind = [s for s in self.running if s.num_tokens - s.computed == 1]
        chunk_budget = self.max_batch_tokens - len(behind)
        decodes, chunks = [], []
        for seq in list(self.running):  # oldest first: preemption takes the newest, never one already planned
            if seq not in self.running:
                continue  # preempted for an older one this step
            remaining = seq.num_tokens - seq.computed
            if remaining == 1:
                if self._grow(seq, 1):
                    decodes.append((seq, 1))
            elif chunk_budget > 0:
                n = self._grow(seq, min(remaining, chunk_budget))
                if n:
                    chunks.append((seq, n))
                    chunk_budget -= n
        in_flight = self._in_flight() if self.waiting and self.pool.prefix_caching else set()
        for seq in list(self.waiting):
            if chunk_budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if self._waits_for_prefix(seq, in_flight):
                continue  # its next blocks are being computed by a running request: it takes them cached instead
            n = self._admit(seq, chunk_budget)
            if not n:
                break  # first come, first served: the first that does not fit waits for blocks, and those behind it
            self.waiting.remove(seq)
            self.running.append(seq)
            chunks.append((seq, n))
            chunk_budget -= n
            if self.pool.prefix_caching:
                in_flight.update(seq.digests[seq.registered :])
        return Step(decodes + chunks, len(decodes))

    def _in_flight(self) -> set[bytes]:
        """Digests of the full prompt blocks that running requests are computing and have not cached yet."""
        return {d for s in self.running if s.computed < len(s.prompt) for d in s.digests[s.registered :]}

    def _waits_for_prefix(self, seq: Sequence, in_flight: set[bytes]) -> bool:
        """Whether the first block ``seq`` would compute is one a running request is computing now: then ``seq``
        waits a step and starts after it, cached, instead of computing the same block again. Requests that arrive
        together with one system prompt (or n sequences of one prompt) prefill it once."""
        if not in_flight or seq.wants_prompt_logits:
            return False
        seq.digests = self.pool.digests(seq.tokens[: seq.num_tokens - 1], seq.digests)
        hit = len(self.pool.lookup(seq.digests))
        return hit < len(seq.digests) and seq.digests[hit] in in_flight

    def advance(self, parts: list[tuple[Sequence, int]]) -> list[int]:
        """The parts' tokens are in the cache now; caches their newly full blocks, and returns the rows whose part
        reached the end of its tokens (the rows to sample)."""
        ready = []
        for row, (seq, n) in enumerate(parts):
            seq.computed += n
            self._register(seq)
            if seq.computed >= seq.num_tokens:
                ready.append(row)
        return ready

    def free(self, seq: Sequence) -> None:
        """``seq`` leaves the engine (finished, cancelled or failed): its blocks go back to the pool."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # -- blocks ---------------------------------------------------------------------------------------------------

    def _blocks_for(self, positions: int) -> int:
        return -(-positions // self.pool.block_size)

    def _grow(self, seq: Sequence, n: int) -> int:
        """Blocks for ``seq``'s next ``n`` tokens; returns how many of them it may run. While blocks are short,
        newer requests are preempted; when ``seq`` is itself the newest, it runs as many tokens as fit, and is
        preempted when not one does (0)."""
        pool = self.pool
        while self._blocks_for(seq.computed + n) - len(seq.block_table) > pool.num_free:
            if self.running[-1] is not seq:
                self._preempt(self.running[-1])
                continue
            n = (len(seq.block_table) + pool.num_free) * pool.block_size - seq.computed
            if n <= 0:
                self._preempt(seq)
                return 0
        need = self._blocks_for(seq.computed + n) - len(seq.block_table)
        seq.block_table += [pool.allocate() for _ in range(need)]
        return n

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Start ``seq`` after its longest cached prefix, with blocks for its first chunk; 0 when they are not
        free (it stays first in line)."""
        pool = self.pool
        hit = []
        if pool.prefix_caching and not seq.wants_prompt_logits:  # the last token is computed: its logits come next
            seq.digests = pool.digests(seq.tokens[: seq.num_tokens - 1], seq.digests)
            hit = pool.lookup(seq.digests[: (seq.num_tokens - 1) // pool.block_size])
        computed = len(hit) * pool.block_size
        n = min(seq.num_tokens - computed, budget)
        need = self._blocks_for(computed + n) - len(hit)
        free = pool.num_free - sum(1 for b in hit if pool.refs[b] == 0)  # held cached blocks stop being free
        if need > free - (self.reserve if self.running else 0):
            return 0
        pool.hold(hit)
        seq.block_table = hit + [pool.allocate() for _ in range(need)]
        seq.computed, seq.registered = computed, len(hit)
        if not seq.admitted:  # hit counts are per request, not per (re)admission after a preemption
            seq.admitted, seq.num_cached_tokens = True, computed
            self.prompt_tokens += len(seq.prompt)
            self.cached_tokens += computed
        return n

    def _register(self, seq: Sequence) -> None:
        """Cache the blocks ``seq`` has filled since the last call (by the digest of what they hold)."""
        full = seq.computed // self.pool.block_size
        if not self.pool.prefix_caching or full <= seq.registered:
            return
        seq.digests = self.pool.digests(seq.tokens[: full * self.pool.block_size], seq.digests)
        for b in range(seq.registered, full):
            self.pool.register(seq.block_table[b], seq.digests[b])
        seq.registered = full

    def _preempt(self, seq: Sequence) -> None:
        """Take ``seq``'s blocks back; it waits first in line and is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table, seq.computed, seq.registered = [], 0, 0
