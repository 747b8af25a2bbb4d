"""Per-request sampling parameters and the sampler that draws a token per row of a batch of logits.

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, stop=("\\n\\n",), logprobs=2,
                            frequency_penalty=0.5, logit_bias=((42, -100.0),), guided=Guided("json_object"))
    tokens = sample(logits, [params, ...], [generator, ...])            # logits [B, V] -> B token ids

``temperature == 0`` is greedy. A seed gives the request its own random generator, so a seeded request draws the
same tokens whatever else runs beside it. Every accepted parameter samples: top-p always keeps the most likely
token, however small ``top_p`` is. What changes the logits before sampling (penalties, bias, ``min_tokens``,
guided decoding) is engine.logits; the guided grammars are engine.guided.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from engine.request import TokenLogprob

MAX_TOP_LOGPROBS = 20
GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def stop_strings(value) -> tuple[str, ...]:
    """OpenAI's ``stop``: None, one string, or a list (a numpy array in a batch row) -> a tuple of strings."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(s) for s in value)


GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily: the limit they tend to, and float32 cannot divide by them safely."""


def logit_bias_pairs(bias, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` ({"token id": bias}) as (id, bias) pairs; ValueError names a key that is not a token
    id of this model, or a bias that is not a number."""
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        if not 0 <= token < vocab_size:
            raise ValueError(f"{key!r} is not a token id of this model (0..{vocab_size - 1})")
        try:
            pairs.append((token, float(value)))
        except (TypeError, ValueError):
            raise ValueError(f"the bias of {key!r} is {value!r}, not a number") from None
    return tuple(pairs)


def token_ids_of(ids, vocab_size: int) -> tuple[int, ...]:
    """Token ids (``stop_token_ids``) as a tuple; ValueError names one outside the model's vocabulary."""
    ids = tuple(int(t) for t in ids)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{bad} is not a token id of this model (0..{vocab_size - 1})")
    return ids


@dataclass(frozen=True)
class Guided:
    """Output held to a language, token by token (guided decoding).

    kind: ``json_schema`` (spec: the schema's JSON), ``json_object`` (any JSON object; no spec), ``regex`` (spec:
    the pattern), ``choice`` (spec: a JSON list of the strings allowed) or ``grammar`` (spec: EBNF, in GBNF's
    notation as llama.cpp and xgrammar read it).
    """

    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in GUIDED_KINDS:
            raise ValueError(f"guided kind {self.kind!r}: expected one of {GUIDED_KINDS}")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"guided {self.kind} needs a spec (the schema, pattern, choices or grammar)")
        if self.kind in ("json_schema", "choice"):
            try:
                value = json.loads(self.spec)
            except ValueError as e:
                raise ValueError(f"guided {self.kind}: the spec is not JSON ({e})") from e
            if self.kind == "json_schema" and not isinstance(value, dict | bool):
                raise ValueError("guided json_schema: the schema must be a JSON object")
            if self.kind == "choice" and not (isinstance(value, list) and value
                                              and all(isinstance(c, str) and c for c in value)):
                raise ValueError("guided choice: expected a non-empty list of non-empty strings")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: the chosen token's and the k most likely
    top_k: int = 0  # sample among the k most likely tokens; 0: all
    presence_penalty: float = 0.0  # subtracted from every token already generated (OpenAI's definition)
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # tokens of the prompt or output: positive logits / p, negative x p; 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), -100 bans, +100 forces
    min_tokens: int = 0  # end-of-sequence and stop tokens are held back until this many tokens
    stop_token_ids: tuple[int, ...] = ()  # more tokens that end the request, beside the model's end tokens
    ignore_eos: bool = False  # the model's end tokens do not end the request (max_tokens does)
    prompt_logprobs: int | None = None  # the log-probability of each prompt token (and k alternatives)
    guided: Guided | None = None

    def __post_init__(self):
        _integer(self.max_tokens, "max_tokens", 1)
        _integer(self.top_k, "top_k", 0)
        _integer(self.min_tokens, "min_tokens", 0)
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature={self.temperature!r}: expected a value in [0, 5]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: expected a value in (0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: expected an integer")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: expected a tuple of non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name}={value!r}: expected None or 0..{MAX_TOP_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a value in [-2, 2]")
        if not 0.01 <= self.repetition_penalty <= 100.0:  # beyond, logits overflow float32 (inf, then NaN)
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}: expected a value in [0.01, 100]")
        if not all(isinstance(t, int) and t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias):
            raise ValueError(f"logit_bias={self.logit_bias!r}: expected (token id >= 0, bias in [-100, 100]) pairs")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: expected token ids")
        if self.guided is not None and (self.ignore_eos or self.min_tokens):
            raise ValueError("guided decoding ends where its grammar does: it takes neither ignore_eos nor min_tokens")

    @property
    def shapes_logits(self) -> bool:
        """Whether engine.logits changes this request's logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.guided is not None)

    def for_sample(self, i: int) -> SamplingParams:
        """The settings of sample i of n that share a prompt (OpenAI's ``n``): with a seed, sample i draws with
        seed + i, so the n differ and a repeated request repeats all of them."""
        return self if self.seed is None or i == 0 else dataclasses.replace(self, seed=self.seed + i)

    def generator(self) -> torch.Generator | None:
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SamplingParams:
        values = json.loads(text)
        guided = values.pop("guided")
        values["stop"] = tuple(values["stop"])
        values["stop_token_ids"] = tuple(values["stop_token_ids"])
        values["logit_bias"] = tuple((int(t), float(b)) for t, b in values["logit_bias"])
        return cls(**values, guided=Guided(**guided) if guided else None)


def check_fits(prompt: list[int], params: SamplingParams, max_model_len: int) -> None:
    """ValueError for an empty prompt, or one whose tokens and max_tokens exceed an engine's max_model_len."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if len(prompt) + params.max_tokens > max_model_len:
        raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the engine's "
                         f"max_model_len of {max_model_len} tokens")


def _integer(value, name: str, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name}={value!r}: expected an integer >= {least}")


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
    if 0 < p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
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
    return logprobs_at(torch.log_softmax(logits.float().cpu(), dim=-1), token_id, k)


def logprobs_at(lp: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    """``logprobs_of`` from log-probabilities [V] already computed."""
    top = []
    if k:
        values, ids = lp.topk(k)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(lp[token_id]), top)
