"""Batched generation where every row has its own sampling parameters.

    params = [SamplingParams(max_tokens=32), SamplingParams(temperature=0.7, seed=1)]
    results = generate(model, tokenizer, [ids_a, ids_b], params)
    for new_tokens in stream(model, tokenizer, ids, SamplingParams()): ...

One left-padded prefill, then one forward per step over the rows still running, each row sampled with its own
temperature, top-p, seed, token budget and stop strings. ``temperature == 0`` is greedy. Used by the batch job
and the server, so both produce the same text for the same request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: expected an integer >= 1")
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature={self.temperature!r}: expected a value in [0, 5]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: expected a value in (0, 1]")


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string) | "length"


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def stream(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[Generation]]:
    """Yield the generations after every decode step (the same objects, growing) until every row has finished."""
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
    device = next(model.parameters()).device
    n = len(prompts)
    limit = context_length(model)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + params[i].max_tokens > limit:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_tokens {params[i].max_tokens} exceed the model's "
                             f"context of {limit} tokens")
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    eos = _eos_ids(model, tokenizer)
    out = [Generation() for _ in range(n)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = result.cache, result.logits[:, -1]
    last_pos = positions[:, -1:]
    for _ in range(max(p.max_tokens for p in params)):
        next_ids = torch.full((n, 1), pad, dtype=torch.long)
        for i, g in enumerate(out):
            if g.finish_reason is None:
                tok = _sample(logits[i].cpu(), params[i], gens[i])
                next_ids[i, 0] = tok
                _append(g, tok, tokenizer, params[i], eos)
        yield out
        if all(g.finish_reason is not None for g in out):
            return
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long, device=device)], dim=1)
        last_pos = last_pos + 1
        result = model(input_ids=next_ids.to(device), attention_mask=mask, position_ids=last_pos, cache=cache,
                       use_cache=True, logits_to_keep=1)
        cache, logits = result.cache, result.logits[:, -1]


def generate(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
    final: list[Generation] = []
    for step in stream(model, tokenizer, prompts, params):
        final = step
    return final


def _append(g: Generation, tok: int, tokenizer, params: SamplingParams, eos: set[int]) -> None:
    if tok in eos:
        g.finish_reason = "stop"
        return
    g.token_ids.append(tok)
    g.text = tokenizer.decode(g.token_ids, skip_special_tokens=True)
    for s in params.stop:
        at = g.text.find(s)
        if at >= 0:
            g.text, g.finish_reason = g.text[:at], "stop"
            return
    if len(g.token_ids) >= params.max_tokens:
        g.finish_reason = "length"


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids
