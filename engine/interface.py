"""The one interface the server and the batch jobs use to generate, whichever engine runs behind it.

    engine: EngineClient = Engine(model, tokenizer, ...).start()
    handle = engine.submit(ids, params)            # events on the handle; handle.cancel() or engine.cancel(handle.id)
    async for out in engine.stream(ids, params):   # the same, as an async iterator
    results = engine.generate(prompts, params)     # to completion, from a thread
    engine.stats()                                 # an engine.metrics.EngineStats

``engine.core.Engine`` (raypress's own engine) implements it; a second implementation (vLLM's engine, on GPU
clusters) implements the same methods, so ``serve/`` and ``jobs/`` run on either without a change to the routes or
the batch stages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from engine.metrics import EngineStats
from engine.request import Generation, RequestHandle, RequestOutput
from engine.sampling import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    max_model_len: int  # prompt plus new tokens of one request
    max_num_seqs: int  # sequences generated together

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        """Queue a request; raises ValueError (with the reason) for one that cannot run."""
        ...

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError (with the reason) for a request this engine cannot run; compiles its grammar."""
        ...

    def submit_n(self, prompt: list[int], params: SamplingParams, n: int) -> list[RequestHandle]:
        """``n`` sequences of one prompt (OpenAI's ``n``), the prompt computed once where the engine can."""
        ...

    def stream(self, prompt: list[int], params: SamplingParams,
               request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit and yield the request's events; leaving early cancels it."""
        ...

    def cancel(self, request_id: str) -> None: ...

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
        """Run requests to completion (blocking); all are checked before any is queued."""
        ...

    def stats(self) -> EngineStats: ...

    def start(self) -> EngineClient:
        """Serve requests from a thread of the engine's own; returns the engine."""
        ...

    def shutdown(self) -> None:
        """Stop; requests still running end with an error, and later submits raise."""
        ...

    def check_health(self) -> None:
        """Raise when the engine can no longer answer (its thread or its workers died)."""
        ...
