"""The per-request logits pipeline: what a request's parameters do to its row of logits before a token is drawn.

    shape_(logits, seqs, ends, guide)     # logits [B, V] float32, row i for seqs[i]; changed in place

In order, for the rows whose parameters ask for it (engine.sampling.SamplingParams):
  repetition_penalty   every token of the prompt and the output: a positive logit divided by it, a negative one
                       multiplied (the CTRL paper's rule, as transformers and vLLM apply it)
  frequency_penalty    OpenAI's definitions, over the tokens generated so far: logit - frequency x count
  presence_penalty       - presence x (count > 0)
  logit_bias           added to the given tokens' logits (-100 bans a token, +100 forces it)
  min_tokens           end-of-sequence and stop tokens held back (-inf) until that many tokens are out
  guided               tokens the request's grammar does not allow next get -inf (engine.guided, one batch of masks)
Rows that ask for none of these are not touched. The log-probabilities a request reports are the model's own, taken
before this pipeline (as OpenAI's and vLLM's are).
"""

from __future__ import annotations

import torch

from engine.request import Sequence


def shape_(logits: torch.Tensor, seqs: list[Sequence], ends: set[int], guide=None) -> None:
    vocab, guided = logits.shape[-1], []
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.shapes_logits:
            continue
        x = logits[row]
        if p.repetition_penalty != 1.0:
            seen = _ids(sorted(set(seq.tokens)), vocab, x.device)
            values = x[seen]
            x[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and seq.output:
            counts = torch.bincount(_ids(seq.output, vocab, x.device), minlength=vocab)[:vocab].to(x.dtype)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
        if p.logit_bias:
            ids = [t for t, _ in p.logit_bias if t < vocab]
            x[_ids(ids, vocab, x.device)] += torch.tensor([b for t, b in p.logit_bias if t < vocab], dtype=x.dtype,
                                                          device=x.device)
        if p.min_tokens and len(seq.output) < p.min_tokens:
            x[_ids(sorted(ends | set(p.stop_token_ids)), vocab, x.device)] = -float("inf")
        if p.guided is not None:
            guided.append((row, seq.matcher))
    if guided:
        guide.mask_(logits, guided)


def _ids(ids: list[int], vocab: int, device) -> torch.Tensor:
    return torch.tensor([t for t in ids if 0 <= t < vocab], dtype=torch.long, device=device)
