"""Guided decoding with xgrammar: a request's output held to a JSON schema, any JSON object, a regex, one of given
strings, or an EBNF grammar, by masking the tokens its grammar does not allow next.

    guide = Guide(tokenizer, vocab_size)              # one per engine: the vocabulary, read once (~0.3 s)
    compiled = guide.compile(Guided("json_schema", schema_text))   # ValueError when it does not compile
    matcher = guide.matcher(compiled)                 # one per request: where its output is in the grammar
    guide.mask_(logits, [(row, matcher), ...])        # disallowed tokens -> -inf, one bitmask for the batch
    matcher.accept_token(token)

Compiled grammars are cached by their text (xgrammar's compiler cache), so a batch whose rows share a schema
compiles it once. Compilation runs in the thread that submits the request, never on the engine's thread, so a large
schema does not hold up the other requests' steps. JSON is generated without free whitespace between tokens (a
small model given the choice can emit newlines until max_tokens), and schemas in strict mode: properties the schema
does not name are not generated.
"""

from __future__ import annotations

import json
import threading

import torch

from engine.sampling import Guided

INSTALL = ("structured outputs need xgrammar, which is not installed where the engine runs: pip install "
           "'raypress[structured]' (or, CPU only: pip install --no-deps xgrammar apache-tvm-ffi)")


class Guide:
    def __init__(self, tokenizer, vocab_size: int):
        try:
            import xgrammar
        except ImportError as e:  # a request the engine cannot run here: the caller's error, as a ValueError
            raise ValueError(INSTALL) from e
        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._bitmask: torch.Tensor | None = None
        self._lock = threading.Lock()  # compile() may run on several submitting threads at once

    def compile(self, guided: Guided):
        """The compiled grammar of ``guided``; ValueError (naming the kind) when it does not compile."""
        c = self.compiler
        try:
            with self._lock:
                if guided.kind == "json_schema":
                    return c.compile_json_schema(guided.spec, any_whitespace=False, strict_mode=True)
                if guided.kind == "json_object":
                    return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
                if guided.kind == "regex":
                    return c.compile_regex(guided.spec)
                if guided.kind == "choice":
                    return c.compile_grammar(choice_grammar(json.loads(guided.spec)))
                return c.compile_grammar(guided.spec)
        except Exception as e:  # whatever xgrammar raises for it (RuntimeError, TypeError, ...), it is the request's
            raise ValueError(f"guided {guided.kind} does not compile: {e}") from e

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask_(self, logits: torch.Tensor, rows: list[tuple[int, object]]) -> None:
        """Set -inf at the tokens each (row, matcher) does not allow next."""
        n = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < n:
            self._bitmask = self.xgr.allocate_token_bitmask(max(n, 16), self.info.vocab_size)
        bitmask = self._bitmask[:n]
        for row, matcher in rows:
            matcher.fill_next_token_bitmask(bitmask, row)
        target = logits if logits.device.type == "cpu" else logits.cpu()
        self.xgr.apply_token_bitmask_inplace(target, bitmask, vocab_size=self.info.vocab_size,
                                             indices=[row for row, _ in rows])
        if target is not logits:
            logits.copy_(target)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose sentences are exactly ``choices``."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)
