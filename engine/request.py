"""What a request is inside the engine, and what it gives back: its events as they come, its final generation, and a
handle to wait on or cancel.

    handle = engine.submit(ids, params)
    async for out in handle:          # RequestOutput events: text and token deltas, then a finish_reason
        ...
    generation = handle.result()      # or, from a thread: block until it has finished

The engine's thread publishes; the handle hands events to whichever side reads them (an asyncio loop, or a thread
waiting on ``result``), so neither the engine nor the reader ever waits on the other. ``Sequence`` is the engine's
own record of a request: its tokens, the cache blocks they fill, and its detokenizer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens, best first


@dataclass(frozen=True)
class RequestOutput:
    """One event of a request: what is new since the previous event."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while running; "stop", "length", "cancelled" or "error" at the end
    num_generated_tokens: int
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache (OpenAI's usage.cached_tokens)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event, when the request asked for them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Generation:
    """A request's whole result: the deltas of its events joined."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string) | "length" | "cancelled" | "error"
    num_prompt_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, None for the first


class RequestHandle:
    def __init__(self, request_id: str, num_prompt_tokens: int, cancel: Callable[[], None]):
        self.id = request_id
        self.generation = Generation(num_prompt_tokens=num_prompt_tokens)
        self._cancel = cancel
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._backlog: list[RequestOutput] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def publish(self, out: RequestOutput) -> None:
        """Called by the engine's thread for every event."""
        g = self.generation
        g.text += out.text
        g.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            g.logprobs = (g.logprobs or []) + out.logprobs
        g.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            g.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            g.finish_reason, g.error = out.finish_reason, out.error
        with self._lock:
            if self._queue is None:
                self._backlog.append(out)
            else:
                try:
                    self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
                except RuntimeError:  # the reader's loop has closed: nobody is listening any more
                    pass
        if out.finished:
            self._done.set()

    def cancel(self) -> None:
        """Stop generating (its cache blocks are freed within a step); the last event has finish_reason 'cancelled'."""
        if not self.done:
            self._cancel()

    def result(self, timeout: float | None = None) -> Generation:
        """Block until the request has finished; the whole generation."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.generation

    async def final(self) -> Generation:
        """Wait (in asyncio) until the request has finished; cancels it if the waiter is cancelled."""
        async for _ in self:
            pass
        return self.generation

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._events()

    async def _events(self) -> AsyncIterator[RequestOutput]:
        with self._lock:
            self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
            for out in self._backlog:
                self._queue.put_nowait(out)
            self._backlog.clear()
        try:
            while True:
                out = await self._queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self.cancel()  # the reader left early (a client disconnected): free its blocks


class Sequence:
    """One request inside the engine: its tokens (prompt, then output), how many of them are in the KV cache and
    in which blocks, its sampling state and detokenizer, and the handle its events go to."""

    def __init__(self, request_id: str, prompt: list[int], params, handle: RequestHandle | None, detokenizer):
        self.id, self.prompt, self.params, self.handle = request_id, prompt, params, handle
        self.generator: torch.Generator | None = params.generator()
        self.detok = detokenizer
        self.tokens = list(prompt)  # prompt + output: what the cache holds once computed
        self.output: list[int] = []
        self.computed = 0  # tokens whose keys and values are in the cache
        self.block_table: list[int] = []  # the cache blocks of its positions, in order
        self.digests: list[bytes] = []  # of its full blocks (engine.blocks), computed as they are needed
        self.registered = 0  # full blocks offered to the prefix cache
        self.admitted = False
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at its first admission
        self.matcher = None  # guided decoding: where the output is in its grammar (engine.guided)
        # the log-probability of each prompt token given those before it, gathered as the prefill runs
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        self.sent_prompt_logprobs = False
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def wants_prompt_logits(self) -> bool:
        """Whether the prefill must keep the logits of every prompt position (for ``prompt_logprobs``)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt)

    def append(self, token: int) -> None:
        """A generated token joins the output (its keys and values are computed the next step)."""
        self.tokens.append(token)
        self.output.append(token)
