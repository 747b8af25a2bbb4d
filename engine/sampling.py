"""Per-request sampling parameters and the sampler that applies them to a batch of logits.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, stop=("\\n\\n",), logprobs=2)
    tokens = sample(logits, [params, ...], [generator, ...])            # logits [B, V] -> B token ids

``temperature == 0`` is greedy. A seed gives the request its own random generator, so a seeded request draws the
same tokens whatever else runs beside it. Every accepted parameter samples: top-p always keeps the most likely
token, however small ``top_p`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import TokenLogprob

MAX_TOP_LOGPROBS = 20


def stop_strings(value) -> tuple[str, ...]:
    """OpenAI's ``stop``: None, one string, or a list (a numpy array in a batch row) -> a tuple of strings."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(s) for s in value)


GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily: the limit they tend to, and float32 cannot divide by them safely."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the k most likely

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: expected an integer >= 1")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature={self.temperature!r}: expected a value in [0, 5]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: expected a value in (0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: expected an integer")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: expected a tuple of non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs!r}: expected None or 0..{MAX_TOP_LOGPROBS}")

    def generator(self) -> torch.Generator | None:
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else None


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` [B, V], each row with its own parameters and generator. Greedy rows are
    decided where the logits are (on a GPU, only B token ids come back); sampled rows come to the CPU together,
    where their generators are."""
    out = logits.argmax(-1).tolist()  # greedy rows are done; sampled rows are overwritten below
    sampled = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if sampled:
        rows = logits[sampled].float().cpu()
        for row, i in zip(rows, sampled, strict=True):
            out[i] = _draw(row, params[i], generators[i])
    return out


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    # shifted so the largest is 0: no overflow to inf (and NaN) however small the temperature
    probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p
        keep[0] = True  # a top_p below float32's smallest step still keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """The model's log-probability of ``token_id`` and of its ``k`` most likely tokens (before temperature)."""
    lp = torch.log_softmax(logits.float().cpu(), dim=-1)
    top = []
    if k:
        values, ids = lp.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(lp[token_id]), top)
