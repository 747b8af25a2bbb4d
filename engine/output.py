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

import json
import re

import torch

from engine.request import RequestOutput, Sequence
from engine.sampling import logprobs_at, logprobs_of


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


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2's scheme) writes each byte as one printable character: the printable ASCII and Latin-1
    bytes as themselves, the others as the code points from 256 up, in byte order. Character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return {(chr(b) if b in printable else chr(next(extra))): b for b in range(256)}


class TokenBytes:
    """The bytes each token id stands for, and a text form of them: what logprobs report per token.

    ``tokenizer.decode([id])`` cannot say this: a token holding part of a UTF-8 character decodes to U+FFFD. Byte-
    level BPE vocabularies (GPT-2, Llama 3, SmolLM2) are read through their byte alphabet, SentencePiece byte
    fallback tokens (``<0xE2>``) as their byte, other pieces as their text (with SentencePiece's word boundary as a
    space). Special tokens are their own text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        try:
            decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        except (AttributeError, ValueError):
            decoder = {}
        self._alphabet = _byte_level_alphabet() if decoder.get("type") == "ByteLevel" else None

    def bytes(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def text(self, token_id: int) -> str:
        """The token's bytes as text; ``bytes:\\xe2\\x80`` (OpenAI's and vLLM's form) where they are not whole UTF-8."""
        raw = self.bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._special:
            return self.tokenizer.decode([token_id]).encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._alphabet is not None and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")


def token_event(seq: Sequence, token: int, logits: torch.Tensor, eos: set[int]) -> RequestOutput:
    """The event one sampled token makes for ``seq`` (whose output it joins unless it is an end token); the event is
    finished when the token ended the request."""
    p = seq.params
    if (token in eos and not p.ignore_eos) or token in p.stop_token_ids:
        return final_event(seq, "stop")
    seq.append(token)
    logprobs = [logprobs_of(logits, token, seq.params.logprobs)] if seq.params.logprobs is not None else None
    if seq.detok.push(token):
        return final_event(seq, "stop", token, logprobs)
    if len(seq.output) >= seq.params.max_tokens:
        return final_event(seq, "length", token, logprobs)
    return RequestOutput(seq.detok.release(), [token], logprobs, None, len(seq.output),
                         num_cached_tokens=seq.num_cached_tokens)


def add_prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> None:
    """Gather the log-probabilities of ``seq``'s prompt tokens from the logits [count, V] of the chunk just run
    (positions ``seq.computed``..): position j's logits score the prompt token at j + 1. A chunk run again after a
    preemption adds nothing twice."""
    got, start = seq.prompt_logprobs, seq.computed
    if got is None:
        return
    lp = torch.log_softmax(logits.float().cpu(), dim=-1)
    for j in range(lp.shape[0]):
        nxt = start + j + 1
        if nxt == len(got) and nxt < len(seq.prompt):
            got.append(logprobs_at(lp[j], seq.prompt[nxt], seq.params.prompt_logprobs))


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
