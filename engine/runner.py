"""Model runners: a scheduled step in, the logits of each part's last token out.

    runner = select_runner(model, cache, max_model_len)     # the lean runner where it applies, else Hugging Face's
    logits = runner.forward(pack(step, cache))               # [parts, vocab]

A step is packed into one row of tokens (``pack``): first one token for each decoding sequence, then the prompt
chunks, laid out in the cache's blocks by ``PagedKVCache.plan``. A runner turns that packed batch into logits:
``engine.lean.LeanRunner`` runs Llama-family float32 models with the fewest operations (the CPU path),
``HFRunner`` runs any Hugging Face decoder whose layers use HF's cache and attention interfaces, with attention
routed to the cache's ``attend``. Every runner has ``name`` and ``forward(batch)``; the engine knows no other.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.kvcache import Layout, PagedKVCache, text_config
from engine.lean import LeanRunner
from engine.scheduler import Step

log = logging.getLogger(__name__)
ATTENTION_NAME = "raypress_paged"
_active = threading.local()  # the cache of the forward running on this thread, if any


@dataclass(frozen=True)
class Batch:
    """One step's tokens, packed: ``tokens`` [N] and where each goes in the cache (``layout``)."""

    tokens: torch.Tensor
    layout: Layout


class Runner(Protocol):
    name: str

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [rows, vocab] at ``batch.layout.logit_rows`` (each part's last token, or all of its tokens)."""
        ...


def pack(step: Step, cache: PagedKVCache) -> Batch:
    """The step's parts (the first ``step.num_decode`` one token each; then prompt chunks) as one row of tokens and
    its cache layout: every part runs the next of its sequence's tokens that are not in the cache yet."""
    decodes, chunks = step.parts[: step.num_decode], step.parts[step.num_decode :]
    tokens = [s.tokens[s.computed] for s, _ in decodes]
    prefill = []
    for seq, count in chunks:
        tokens += seq.tokens[seq.computed : seq.computed + count]
        prefill.append((seq.block_table, seq.computed, count, seq.wants_prompt_logits))
    layout = cache.plan([(s.block_table, s.computed + 1) for s, _ in decodes], prefill)
    return Batch(torch.tensor(tokens, device=cache.device), layout)


def select_runner(model, cache: PagedKVCache, max_model_len: int, lean: bool = True) -> Runner:
    """The lean runner where it applies to ``model`` (and ``lean`` is set), else the Hugging Face runner."""
    runner = LeanRunner.for_model(model, cache, max_model_len) if lean else None
    return runner if runner is not None else HFRunner(model, cache)


class HFRunner:
    """The model's own Hugging Face forward over the packed step, its attention layers reading the engine's cache."""

    name = "hf"

    def __init__(self, model, cache: PagedKVCache):
        self.model, self.cache = model, cache

    def forward(self, batch: Batch) -> torch.Tensor:
        lay = batch.layout
        with cache_attention(self.cache):
            out = self.model(input_ids=batch.tokens[None], position_ids=lay.positions, attention_mask=lay.dummy_mask,
                             cache=self.cache, use_cache=True, logits_to_keep=lay.logit_rows)
        return out.logits[0]


# attention variants that models pass to HF's attention interface and the engine's attention does not compute
_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks",
                       "sinks": "attention sinks"}


def unsupported_attention(model) -> str | None:
    """Why the engine's attention would compute something else than ``model``'s own (None when it would not)."""
    config = text_config(model)
    if getattr(config, "attn_logit_softcapping", None):
        return f"attention logit soft-capping (attn_logit_softcapping={config.attn_logit_softcapping})"
    kinds = set(getattr(config, "layer_types", None) or ())
    if len(kinds) > 1:
        return f"layers of different attention kinds ({sorted(kinds)}: a sliding window on some layers only)"
    if any("sink" in name for name in vars(config)) and any(getattr(config, n) for n in vars(config) if "sink" in n):
        return "attention sinks"
    return None


def _cache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     **kwargs):
    cache = getattr(_active, "cache", None)
    if cache is None or cache.layout is None:
        raise RuntimeError("raypress cache attention runs only inside an engine forward")
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"this model's attention uses {what} ({name}), which raypress's engine does "
                                      "not compute")
    if sliding_window is not None and sliding_window != cache.sliding_window:
        raise NotImplementedError(f"this layer's sliding window ({sliding_window}) is not the cache's "
                                  f"({cache.sliding_window}): raypress's engine applies one window to every layer")
    return cache.attend(module.layer_idx, query, scaling if scaling is not None else query.shape[-1] ** -0.5), None


@contextlib.contextmanager
def cache_attention(cache: PagedKVCache):
    """Route the model's attention layers to ``cache.attend`` for the duration of one forward on this thread.

    The model's own attention implementation is restored afterwards, so the same model object still runs
    ``generate`` or a plain forward as before."""
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _cache_attention)
    saved = [c._attn_implementation_internal for c in cache.model_configs]
    _active.cache = cache
    cache.attention_calls = 0
    try:
        for c in cache.model_configs:
            c._attn_implementation_internal = ATTENTION_NAME
        yield
    finally:
        for c, name in zip(cache.model_configs, saved, strict=True):
            c._attn_implementation_internal = name
        _active.cache = None
    if cache.attention_calls == 0:
        raise NotImplementedError("this model does not use Hugging Face's attention interface, so the engine cannot "
                                  "run it")
