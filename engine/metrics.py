"""What the engine counts: requests, tokens, steps, and histograms of time to first token, step time and decode batch.

    metrics = EngineMetrics()
    metrics.observe_step(seconds, decode_batch=8)
    metrics.add_phase("forward_decode", seconds)                      # where the steps' time went, summed
    snapshot = metrics.snapshot(running=3, waiting=0, max_num_seqs=16, cache=CacheStats(...))   # an EngineStats

The engine's thread writes; readers take a snapshot, whose counters are plain numbers and whose histograms are
copies, so a reader never sees a histogram half updated.
"""

from __future__ import annotations

import bisect
import copy
import time
from collections import deque
from dataclasses import dataclass


class Histogram:
    """Counts of observations at or below each bound (Prometheus buckets), with their sum."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last counts what is above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound), ending with (inf, count)."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(frozen=True)
class CacheStats:
    """The KV cache's blocks, and what the prefix cache saved."""

    blocks: int
    block_size: int
    free_blocks: int  # free to allocate: never used, or cached and held by no request
    cached_blocks: int  # full blocks known by their prefix, held or not
    prompt_tokens: int  # of requests admitted so far (each once)
    cached_tokens: int  # of those, the tokens found in the cache
    preemptions: int  # running requests sent back to wait for blocks (recomputed later)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class EngineStats:
    """One reading of an engine: what ``/stats`` answers and ``/metrics`` exports."""

    running: int
    waiting: int
    max_num_seqs: int
    requests: int
    prompt_tokens: int
    generation_tokens: int
    steps: int
    max_decode_batch: int
    generation_tokens_per_s: float
    ttft_s: Histogram
    step_s: Histogram
    decode_batch: Histogram
    cache: CacheStats
    phase_s: dict[str, float]  # seconds of steps spent in each of PHASES, summed over all steps

    def counters(self) -> dict:
        """The plain numbers, by name (what /stats answers)."""
        return {"running": self.running, "waiting": self.waiting, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
                "steps": self.steps, "max_decode_batch": self.max_decode_batch, "max_num_seqs": self.max_num_seqs,
                "generation_tokens_per_s": self.generation_tokens_per_s, "kv_blocks": self.cache.blocks,
                "kv_blocks_free": self.cache.free_blocks, "kv_blocks_cached": self.cache.cached_blocks,
                "prefix_cache_hit_rate": self.cache.hit_rate, "cached_prompt_tokens": self.cache.cached_tokens,
                "preemptions": self.cache.preemptions, "step_phase_seconds": dict(self.phase_s)}


# Where a step's time goes: choosing its parts, packing them and advancing its sequences after the forward (with the
# prompt logprobs of requests that ask for them); the forward of a step that runs prompt chunks (with the decode rows
# it carries) or of a decode-only step; sampling (penalties, bias and grammars included); and publishing each
# request's output (detokenizing, stop strings, logprobs).
PHASES = ("schedule", "forward_prefill", "forward_decode", "sample", "output")


class EngineMetrics:
    """The engine's counters and histograms, written by its thread."""

    RATE_WINDOW_S = 10.0

    def __init__(self):
        self.requests = self.prompt_tokens = self.generation_tokens = self.steps = self.max_decode_batch = 0
        self.decode_batch = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft_s = Histogram((0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.step_s = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        # (time, generation tokens) after each step of the last RATE_WINDOW_S, and the one step before them
        self._recent: deque[tuple[float, int]] = deque()
        self.phase_s = dict.fromkeys(PHASES, 0.0)

    def add_phase(self, phase: str, seconds: float) -> None:
        """``seconds`` of a step went to ``phase`` (one of PHASES)."""
        self.phase_s[phase] += seconds

    def observe_step(self, seconds: float, decode_batch: int) -> None:
        """A step ended: it took ``seconds`` and decoded ``decode_batch`` running sequences."""
        if decode_batch:
            self.decode_batch.observe(decode_batch)
            self.max_decode_batch = max(self.max_decode_batch, decode_batch)
        self.steps += 1
        self.step_s.observe(seconds)
        now = time.perf_counter()
        self._recent.append((now, self.generation_tokens))
        while len(self._recent) > 2 and self._recent[1][0] < now - self.RATE_WINDOW_S:
            self._recent.popleft()  # a count of steps, not of entries: right at any step rate

    def observe_first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.ttft_s.observe(seconds)
        self.prompt_tokens += prompt_tokens

    def tokens_per_s(self, window_s: float = RATE_WINDOW_S) -> float:
        """Generated tokens per second over the last ``window_s`` seconds of steps."""
        recent = list(self._recent)
        now = time.perf_counter()
        inside = [(t, n) for t, n in recent if t >= now - window_s]
        if not inside:
            return 0.0
        before = next((n for t, n in reversed(recent) if t < now - window_s), 0)
        return (inside[-1][1] - before) / window_s

    def snapshot(self, running: int, waiting: int, max_num_seqs: int, cache: CacheStats) -> EngineStats:
        return EngineStats(
            running=running, waiting=waiting, max_num_seqs=max_num_seqs, requests=self.requests,
            prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens, steps=self.steps,
            max_decode_batch=self.max_decode_batch, generation_tokens_per_s=self.tokens_per_s(),
            ttft_s=copy.deepcopy(self.ttft_s), step_s=copy.deepcopy(self.step_s),
            decode_batch=copy.deepcopy(self.decode_batch), cache=cache, phase_s=dict(self.phase_s))
