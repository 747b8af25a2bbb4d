"""vLLM behind raypress's whole engine interface (``EngineClient``): what the serving app runs on with
``engine: vllm``, so every route, field check, grammar, tool call and the Batch API stay raypress's own while vLLM
generates.

    engine = AsyncVllmEngine(folder, max_num_seqs=16, max_model_len=2048).start()
    handle = engine.submit(ids, params)    # raypress's RequestHandle: its events, its cancel
    async for out in handle: ...

vLLM's ``AsyncLLM`` runs on an event loop of its own, in a thread of this class, as raypress's engine runs on its
own thread: ``submit`` may be called from any thread, and each request's events (vLLM's deltas) are published to
its handle as raypress's engine publishes them. A cancelled handle aborts its vLLM request.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from engine.metrics import CacheStats, EngineMetrics, EngineStats
from engine.request import Generation, RequestHandle, RequestOutput
from engine.sampling import SamplingParams
from engine.vllm import Checks, engine_args, finish_reason, logprob_entries, own_tokens, vllm_params

_ids = itertools.count()


class AsyncVllmEngine(Checks):
    def __init__(self, model: str | Path, *, max_num_seqs: int = 16, max_model_len: int = 2048, **settings):
        """``settings``: engine.vllm.engine_args's (dtype, tensor_parallel_size, seed, enforce_eager, vLLM's own)."""
        args = engine_args(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len, **settings)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.metrics, self._running = EngineMetrics(), set()
        self._scheduler = SchedulerCounters(self.metrics)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()

        async def make():
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[self._scheduler.logger()])

        self.llm = asyncio.run_coroutine_threadsafe(make(), self._loop).result()
        self.tokenizer = self.llm.tokenizer
        self.vocab_size = self.llm.model_config.get_vocab_size()

    def start(self) -> AsyncVllmEngine:
        return self  # vLLM's loop runs from the start

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        self.check(prompt, params)
        request_id = request_id or f"vllm-{next(_ids)}"
        handle = RequestHandle(request_id, len(prompt), cancel=lambda: self.cancel(request_id))
        self.metrics.requests += 1
        asyncio.run_coroutine_threadsafe(self._run(handle, list(prompt), params), self._loop)
        return handle

    def submit_n(self, prompt: list[int], params: SamplingParams, n: int) -> list[RequestHandle]:
        """n requests of one prompt (vLLM's prefix cache computes it once); sample i draws with seed + i."""
        if n < 1:
            raise ValueError(f"n={n}: expected >= 1")
        self.check(prompt, params)
        return [self.submit(prompt, params.for_sample(i)) for i in range(n)]

    async def stream(self, prompt: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        async for out in self.submit(prompt, params, request_id):
            yield out

    def cancel(self, request_id: str) -> None:
        asyncio.run_coroutine_threadsafe(self.llm.abort(request_id), self._loop)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
        for p, s in zip(prompts, params, strict=True):  # all or nothing: refuse before queueing any
            self.check(p, s)
        return [h.result() for h in [self.submit(p, s) for p, s in zip(prompts, params, strict=True)]]

    def stats(self) -> EngineStats:
        """raypress's counters over vLLM: requests, tokens and first-token times counted here; the queue, steps, KV
        blocks and prefix-cache hits as vLLM's scheduler reports them (blocks cached for reuse are not reported)."""
        return self.metrics.snapshot(len(self._running), self._scheduler.waiting, self.max_num_seqs,
                                     self._scheduler.cache())

    def shutdown(self) -> None:
        self.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def check_health(self) -> None:
        if self.llm.errored or not self._thread.is_alive():
            raise RuntimeError("vLLM's engine has died; see the replica's log for the exception")

    async def _run(self, handle: RequestHandle, prompt: list[int], params: SamplingParams) -> None:
        """vLLM's deltas for one request, published to its handle as raypress's engine publishes its events."""
        from vllm.sampling_params import RequestOutputKind

        sp = vllm_params(params)
        sp.output_kind = RequestOutputKind.DELTA
        start, made, first = time.perf_counter(), 0, True
        self._running.add(handle.id)
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt}, sp, handle.id):
                seq = out.outputs[0]
                tokens, entries = own_tokens(seq)
                if first and seq.token_ids:
                    self.metrics.observe_first_token(time.perf_counter() - start, len(prompt))
                made += len(tokens)
                self.metrics.generation_tokens += len(tokens)
                prompt_lp = logprob_entries(prompt, out.prompt_logprobs, params.prompt_logprobs) if first else None
                first = first and not seq.token_ids
                handle.publish(RequestOutput(seq.text, tokens, logprob_entries(tokens, entries, params.logprobs),
                                             finish_reason(seq.finish_reason) if out.finished else None, made,
                                             num_cached_tokens=out.num_cached_tokens or 0,
                                             prompt_logprobs=prompt_lp))
        except Exception as e:  # vLLM refused or failed the request: its handle ends with the reason
            if not handle.done:
                handle.publish(RequestOutput("", [], None, "error", made, error=f"{type(e).__name__}: {e}"))
        finally:
            self._running.discard(handle.id)
            if not handle.done:  # aborted (cancelled) without a final event
                handle.publish(RequestOutput("", [], None, "cancelled", made))


class SchedulerCounters:
    """What vLLM's scheduler reports after each step, summed, and its steps counted in raypress's metrics: kept by
    the vLLM stat logger ``logger()`` makes (it runs on vLLM's loop)."""

    def __init__(self, metrics: EngineMetrics):
        self.metrics = metrics
        self.waiting = self.queries = self.hits = self.preemptions = self.blocks = self.block_size = 0
        self.usage, self.last, self.busy = 0.0, time.perf_counter(), False

    def observe(self, scheduler, iteration, cache_config) -> None:
        """One report: vLLM's SchedulerStats and IterationStats (either may be None)."""
        if scheduler is not None:
            self.waiting, self.usage = scheduler.num_waiting_reqs, scheduler.kv_cache_usage
            self.queries += scheduler.prefix_cache_stats.queries
            self.hits += scheduler.prefix_cache_stats.hits
            self.blocks, self.block_size = cache_config.num_gpu_blocks or 0, cache_config.block_size or 0
        if iteration is not None and scheduler is not None:
            self.preemptions += iteration.num_preempted_reqs
            now, running = time.perf_counter(), scheduler.num_running_reqs
            self.metrics.observe_step(now - self.last if self.busy else 0.0, running)  # idle time is no step's
            self.last, self.busy = now, running > 0

    def cache(self) -> CacheStats:
        free = round(self.blocks * (1 - self.usage))  # blocks cached for reuse are not reported: 0
        return CacheStats(self.blocks, self.block_size, free, 0, self.queries, self.hits, self.preemptions)

    def logger(self):
        """A vLLM stat-logger factory (``AsyncLLM``'s ``stat_loggers``) whose loggers report to these counters."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        counters = self

        class Reader(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                self.cache_config = vllm_config.cache_config

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                counters.observe(scheduler_stats, iteration_stats, self.cache_config)

            def log_engine_initialized(self):
                pass

        return Reader
