"""The generation engine: iteration-level batching over a paged KV cache with prefix caching, on one thread.

    engine = Engine(model, tokenizer, max_num_seqs=16, max_model_len=2048, max_batch_tokens=256)
    results = engine.generate([ids_a, ids_b], [SamplingParams(max_tokens=32), SamplingParams(temperature=0.7)])

    engine.start()                                    # a background thread owns the model from here on
    handle = engine.submit(ids, SamplingParams(max_tokens=64, stop=("\\n\\n",)))
    async for out in handle: print(out.text, end="")  # deltas, token by token; handle.cancel() frees its blocks
    async for out in engine.stream(ids, params): ...  # the same, submitted for you

Every step: take new requests and cancellations, let the scheduler (engine.scheduler) choose the step's parts, have
the runner (engine.runner, engine.lean) turn them into logits in one packed forward, sample each row with its own
parameters (engine.sampling), and publish each request's new text (engine.output). A sequence leaves the batch the
step it finishes, and a waiting request takes its place the next step, so short requests never wait for long ones.
The KV cache is a pool of blocks (engine.blocks): a request holds the blocks its tokens fill, and the full blocks of
every prompt and answer stay cached after it ends, so a later prompt that starts the same way (a system prompt, a
conversation sent again with its next turn, a batch's shared instructions) prefills only what follows them.
The batch job and the server both run on this engine, through the methods of ``engine.interface.EngineClient``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

import torch

from compress import hf
from engine.blocks import BlockPool
from engine.guided import Guide
from engine.kvcache import PagedKVCache
from engine.logits import shape_
from engine.metrics import CacheStats, EngineMetrics, EngineStats
from engine.output import Detokenizer, add_prompt_logprobs, eos_ids, final_event, token_event
from engine.request import Generation, RequestHandle, RequestOutput, Sequence
from engine.runner import pack, select_runner, unsupported_attention
from engine.sampling import SamplingParams, check_fits, sample
from engine.scheduler import Scheduler, Step

log = logging.getLogger(__name__)
_ids = itertools.count()


class Engine:
    """Continuous batching for a Hugging Face causal LM whose layers use HF's cache and attention interfaces
    (Llama, Qwen2, Mistral and their kin). The engine owns the model: while its thread runs, do not run the same
    model object elsewhere (during a step its attention layers read the engine's cache).

    Args:
        model, tokenizer: as ``compress.models.load`` returns them.
        max_num_seqs: sequences decoded together.
        max_model_len: prompt plus new tokens of one request; default the model's context, at most 2048.
        max_batch_tokens: tokens one step runs: one per running sequence plus prompt chunks.
        num_threads: torch threads for the engine's thread (CPU).
        lean: run steps on ``engine.lean.LeanRunner`` (Llama-family float32 models; default: wherever it
            applies) instead of the model's Hugging Face forward.
        block_size: positions per KV-cache block (the unit of memory and of prefix sharing).
        kv_cache_tokens: positions the KV cache holds over all requests; default max_num_seqs x max_model_len
            (every sequence at its longest). Requests take what they use, so less memory runs as many requests
            when they are shorter; one that does not fit waits.
        prefix_caching: keep full blocks after a request ends and reuse them for prompts that start the same way.
    """

    def __init__(self, model, tokenizer, *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 max_batch_tokens: int = 512, num_threads: int | None = None, lean: bool = True,
                 block_size: int = 16, kv_cache_tokens: int | None = None, prefix_caching: bool = True):
        limit = hf.context_length(model.config)
        max_model_len = min(limit, 2048) if max_model_len is None else max_model_len
        if not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len}: expected 1..{limit} (the model's context)")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: expected >= 1")
        reason = unsupported_attention(model)
        if reason:
            raise ValueError(f"{type(model).__name__} uses {reason}, which raypress's engine does not implement; "
                             "serve this model on vLLM, or generate with transformers")
        kv_cache_tokens = max_num_seqs * max_model_len if kv_cache_tokens is None else kv_cache_tokens
        if kv_cache_tokens < max_model_len:
            raise ValueError(f"kv_cache_tokens={kv_cache_tokens}: expected at least max_model_len={max_model_len} "
                             "(the longest request must fit)")
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_model_len, self.max_batch_tokens = max_num_seqs, max_model_len, max_batch_tokens
        self.num_threads = num_threads
        num_blocks = -(-kv_cache_tokens // block_size)
        name = f"{type(model).__name__}:{getattr(model.config, '_name_or_path', '')}"
        self.pool = BlockPool(num_blocks, block_size, prefix_caching, salt=name.encode())
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_batch_tokens)
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.runner = select_runner(model, self.cache, max_model_len, lean=lean)
        self.eos = eos_ids(model, tokenizer)
        self.metrics = EngineMetrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()  # submit against shutdown: nothing is queued once the engine has closed
        self.guide: Guide | None = None  # guided decoding (engine.guided), made at the first request that asks

    # -- requests -------------------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        """Queue a request; its events arrive on the returned handle. Raises ValueError for one that cannot run (too
        long for max_model_len, a grammar that does not compile)."""
        self.check(prompt, params)
        return self._queue(prompt, params, request_id)

    def submit_n(self, prompt: list[int], params: SamplingParams, n: int) -> list[RequestHandle]:
        """``n`` sequences of one prompt (OpenAI's ``n``). The first is prefilled and the others wait for its full
        blocks and start from them cached (the scheduler's rule for any requests sharing a prefix), so the prompt is
        computed once with prefix caching on. With a seed, sequence i draws with seed + i
        (``SamplingParams.for_sample``)."""
        if n < 1:
            raise ValueError(f"n={n}: expected >= 1")
        self.check(prompt, params)
        return [self._queue(prompt, params.for_sample(i), None) for i in range(n)]

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError (with the reason) for a request this engine cannot run; compiles its grammar."""
        check_fits(prompt, params, self.max_model_len)
        # (the pool holds at least max_model_len positions, so such a request fits once the others are done)
        if params.guided is not None:
            self._guide().compile(params.guided)  # cached by its text: _queue's compile finds it

    def _queue(self, prompt, params, request_id) -> RequestHandle:
        request_id = request_id or f"req-{next(_ids)}"
        handle = RequestHandle(request_id, len(prompt), cancel=lambda: self.cancel(request_id))
        seq = Sequence(request_id, list(prompt), params, handle, Detokenizer(self.tokenizer, params.stop))
        if params.guided is not None:  # compiled here, in the caller's thread: never on the engine's
            guide = self._guide()
            seq.matcher = guide.matcher(guide.compile(params.guided))
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine has been shut down: it takes no more requests")
            self._inbox.put(("add", seq))
        return handle

    def _guide(self) -> Guide:
        with self._lock:  # made at the first guided request: reading the vocabulary takes a moment
            if self.guide is None:
                self.guide = Guide(self.tokenizer, self.model.config.vocab_size)
            return self.guide

    async def stream(self, prompt: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit and yield the request's events; leaving the loop early cancels the request."""
        async for out in self.submit(prompt, params, request_id):
            yield out

    def cancel(self, request_id: str) -> None:
        """Stop a request (its blocks are free within a step); its last event has finish_reason 'cancelled'."""
        self._inbox.put(("cancel", request_id))

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
        """Run requests to completion; steps on the calling thread unless the engine's thread is running."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        for p, s in zip(prompts, params, strict=True):  # all or nothing: refuse before queueing any
            self.check(p, s)
        handles = [self.submit(p, s) for p, s in zip(prompts, params, strict=True)]
        if self._thread is None:
            with torch.inference_mode():
                while not all(h.done for h in handles):
                    self.step()
        return [h.result() for h in handles]

    def stats(self) -> EngineStats:
        """Counters and histograms now (requests, tokens, steps, time to first token, step time, decode batch)."""
        s, pool = self.scheduler, self.pool
        cache = CacheStats(pool.num_blocks, pool.block_size, pool.num_free, pool.num_cached, s.prompt_tokens,
                           s.cached_tokens, s.preemptions)
        return self.metrics.snapshot(s.num_running, s.num_waiting, self.max_num_seqs, cache)

    # -- the thread -----------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Own the model on a background thread; from now on requests only go through ``submit``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="raypress-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop taking requests; those queued or running end with an error event."""
        with self._lock:
            self._closed = True
            self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        else:
            self._take_inbox(block=False)  # no thread: fail what was queued here

    def check_health(self) -> None:
        """Raise if the engine's thread has died (a started engine that can no longer answer)."""
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("the engine's thread has died; see the replica's log for the exception")

    def _loop(self) -> None:
        if self.num_threads:  # OpenMP keeps its thread count per calling thread
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while self._take_inbox(block=not (self.scheduler.num_waiting or self.scheduler.num_running)):
                try:
                    self.step(take_inbox=False)
                except Exception as e:  # never let the thread die with requests waiting on it
                    log.exception("raypress engine: a step failed")
                    self._fail_all(f"engine step failed: {type(e).__name__}: {e}")

    def _take_inbox(self, block: bool) -> bool:
        """Move queued requests and cancellations into the engine; False when asked to stop."""
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, value = item
            if kind == "stop":
                self._fail_all("the engine was shut down")
                self._drain()
                return False
            if kind == "add":
                self.scheduler.add(value)
                self.metrics.requests += 1
            else:
                self._cancel(value)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    # -- one step -------------------------------------------------------------------------------------------------

    def step(self, take_inbox: bool = True) -> None:
        """Admit, then one forward: a token for every running sequence plus the planned prompt chunks; publish."""
        if take_inbox:
            self._take_inbox(block=False)
        s = self.scheduler
        if not (s.num_waiting or s.num_running):
            return
        start = time.perf_counter()
        step = s.schedule()
        if step.parts:
            self._run(step, start)
        else:
            self.metrics.add_phase("schedule", time.perf_counter() - start)
        self.metrics.observe_step(time.perf_counter() - start, step.num_decode)

    def _run(self, step: Step, start: float) -> None:
        """One forward over the step's parts; sample where a part reaches the end of its tokens, and publish. The
        time of each phase (``engine.metrics.PHASES``) from ``start`` is added to the metrics."""
        parts, phase = step.parts, self.metrics.add_phase
        try:
            batch = pack(step, self.cache)
            packed = time.perf_counter()
            logits = self.runner.forward(batch)
        except Exception as e:  # the step's requests fail with the reason; the engine goes on with new ones
            log.exception("raypress engine: a forward over %d requests failed", len(parts))
            for seq, _ in parts:
                self._finish(seq, final_event(seq, "error", error=f"{type(e).__name__}: {e}"))
            return
        forward = time.perf_counter()
        phase("forward_prefill" if len(parts) > step.num_decode else "forward_decode", forward - packed)
        rows = batch.layout.part_rows  # each part's rows of the logits: all of a chunk's for prompt logprobs
        for (seq, _), part in zip(parts, rows, strict=True):
            if len(part) > 1:
                add_prompt_logprobs(seq, logits[part.start : part.stop])
        ready = self.scheduler.advance(parts)
        sampling = time.perf_counter()
        phase("schedule", sampling - forward + packed - start)
        if not ready:
            return
        seqs = [parts[r][0] for r in ready]
        last = [rows[r][-1] for r in ready]
        chosen = logits[last]  # a copy: penalties, bias and grammars change it; logprobs report the model's own
        try:
            shape_(chosen, seqs, self.eos, self.guide)
            tokens = sample(chosen, [s.params for s in seqs], [s.generator for s in seqs])
        except Exception:  # one row's parameters must not fail the others: sample row by row
            chosen = logits[last]
            tokens = [self._sample_one(seq, chosen[i : i + 1]) for i, seq in enumerate(seqs)]
        output = time.perf_counter()
        phase("sample", output - sampling)
        self._publish(seqs, last, tokens, logits)
        phase("output", time.perf_counter() - output)

    def _publish(self, seqs: list[Sequence], last: list[int], tokens: list[int | None], logits) -> None:
        for row, seq, token in zip(last, seqs, tokens, strict=True):
            if token is None:
                continue
            try:
                self._emit(seq, token, logits[row])
            except Exception as e:  # a fault in one request's output (its detokenizer, its logprobs) is its own
                log.exception("raypress engine: the output of %s failed", seq.id)
                self._finish(seq, final_event(seq, "error", error=f"output failed: {type(e).__name__}: {e}"))

    def _sample_one(self, seq: Sequence, logits: torch.Tensor) -> int | None:
        try:
            shape_(logits, [seq], self.eos, self.guide)
            return sample(logits, [seq.params], [seq.generator])[0]
        except Exception as e:
            log.exception("raypress engine: sampling failed for %s", seq.id)
            self._finish(seq, final_event(seq, "error", error=f"sampling failed: {type(e).__name__}: {e}"))
            return None

    # -- results --------------------------------------------------------------------------------------------------

    def _emit(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            self.metrics.observe_first_token(seq.first_token_at - seq.arrival, len(seq.prompt))
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise ValueError(f"token {token} is not in the request's grammar")
        if seq.matcher is not None and seq.matcher.is_terminated():  # the grammar's end token: the output is whole
            out = final_event(seq, "stop")
        else:
            out = token_event(seq, token, logits, self.eos)
        if seq.prompt_logprobs is not None and not seq.sent_prompt_logprobs:  # on the request's first event
            out, seq.sent_prompt_logprobs = dataclasses.replace(out, prompt_logprobs=seq.prompt_logprobs), True
        self.metrics.generation_tokens += len(out.token_ids)
        if out.finished:
            self._finish(seq, out)
        else:
            seq.handle.publish(out)

    def _finish(self, seq: Sequence, out: RequestOutput) -> None:
        self.scheduler.free(seq)
        if not seq.handle.done:  # a request ends once, whatever failed after its end
            seq.handle.publish(out)

    def _cancel(self, request_id: str) -> None:
        seq = next((s for s in self.scheduler.sequences() if s.id == request_id), None)
        if seq is not None:
            self._finish(seq, RequestOutput("", [], None, "cancelled", len(seq.output),
                                            num_cached_tokens=seq.num_cached_tokens))

    def _fail_all(self, message: str) -> None:
        for seq in list(self.scheduler.sequences()):
            self._finish(seq, final_event(seq, "error", error=message))

    def _drain(self) -> None:
        """Requests still in the inbox once the engine has stopped get their error."""
        while True:
            try:
                kind, value = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                value.handle.publish(final_event(value, "error", error="the engine was shut down"))
