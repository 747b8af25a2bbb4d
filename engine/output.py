"""What the engine sends back: each sampled token turned into a request's event (text, finish reason), through an
incremental detokenizer that never takes text back.

    event = token_event(seq, token, logits, eos)     # a RequestOutput; finished when the token ended the request

    d = Detokenizer(tokenizer, stop=("\\n\\n",))
    for token in tokens:
        stopped = d.push(token)
        delta = d.release()           # new text that is safe to send
    delta = d.release(final=True)     # whatever was held back

A request ends at an end-of-sequence token (not sent), at a stop string (cut before it), or at ``max_tokens``.
Each step decodes only a short window of recent tokens (the window keeps the space and merge rules of the
tokenizer right at the seam). Text is held back while it ends in an incomplete UTF-8 character or could still turn
into a stop string, so the deltas joined are exactly ``text``: cut before the first stop string, which is never
sent.
"""

from __future__ import annotations

import torch

from engine.request import RequestOutput, Sequence
from engine.sampling import logprobs_of


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a sequence: from the generation config, the model config and the tokenizer."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def token_event(seq: Sequence, token: int, logits: torch.Tensor, eos: set[int]) -> RequestOutput:
    """The event one sampled token makes for ``seq`` (whose output it joins unless it is an end token); the event is
    finished when the token ended the request."""
    if token in eos:
        return final_event(seq, "stop")
    seq.append(token)
    logprobs = [logprobs_of(logits, token, seq.params.logprobs)] if seq.params.logprobs is not None else None
    if seq.detok.push(token):
        return final_event(seq, "stop", token, logprobs)
    if len(seq.output) >= seq.params.max_tokens:
        return final_event(seq, "length", token, logprobs)
    return RequestOutput(seq.detok.release(), [token], logprobs, None, len(seq.output),
                         num_cached_tokens=seq.num_cached_tokens)


def final_event(seq: Sequence, reason: str, token: int | None = None, logprobs=None,
                error: str | None = None) -> RequestOutput:
    """The last event of ``seq``: what text was held back (none after an error), and why it ended."""
    text = seq.detok.release(final=True) if error is None else ""
    return RequestOutput(text, [] if token is None else [token], logprobs, reason, len(seq.output), error=error,
                         num_cached_tokens=seq.num_cached_tokens)


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.stopped = False
        self._prefix_offset = 0  # window start: tokens before it are already text
        self._read_offset = 0  # tokens up to here are in self.text
        self._sent = 0  # characters of self.text released
        self._checked = 0  # characters of self.text already searched for stop strings

    def push(self, token_id: int) -> bool:
        """Add one generated token; returns True once a stop string has appeared (the text is cut before it)."""
        if self.stopped:
            raise RuntimeError("push after a stop string")
        self.ids.append(token_id)
        self._decode_window(final=False)
        return self._find_stop()

    def release(self, final: bool = False) -> str:
        """The text that became safe since the last call; with ``final``, everything not yet sent."""
        if final and not self.stopped:
            self._decode_window(final=True)
            self._find_stop()
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_for_stop()
        delta = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def _decode_window(self, final: bool) -> None:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        window = decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):
            self.text += window[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)

    def _find_stop(self) -> bool:
        if not self.stop or self.stopped:
            return self.stopped
        longest = max(map(len, self.stop))
        start = max(0, self._checked - longest + 1)
        hits = [at for s in self.stop if (at := self.text.find(s, start)) >= 0]
        self._checked = len(self.text)
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        return self.stopped

    def _held_for_stop(self) -> int:
        """Characters at the end of the text that are the start of some stop string."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held
