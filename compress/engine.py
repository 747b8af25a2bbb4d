"""The generation engine: iteration-level batching over a fixed set of KV-cache slots, on one thread.

    engine = Engine(model, tokenizer, max_num_seqs=16, max_model_len=2048, max_batch_tokens=256)
    results = engine.generate([ids_a, ids_b], [SamplingParams(max_tokens=32), SamplingParams(temperature=0.7)])

    engine.start()                                    # a background thread owns the model from here on
    handle = engine.submit(ids, SamplingParams(max_tokens=64, stop=("\\n\\n",)))
    async for out in handle: print(out.text, end="")  # deltas, token by token; handle.cancel() frees the slot

Every step: take new requests and cancellations, plan (compress.scheduler), run the prompt chunks and one decode
forward over every running sequence, sample each row with its own parameters, and publish each request's new
text. A sequence leaves the batch the step it finishes, and a waiting request takes its slot the next step, so
short requests never wait for long ones. The batch job and the server both run on this engine.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque

import torch

from compress import hf
from compress.detokenize import Detokenizer
from compress.kvcache import SlotKVCache, slot_attention
from compress.lean import LeanForward
from compress.request import Generation, Histogram, RequestHandle, RequestOutput
from compress.sampling import SamplingParams, logprobs_of, sample
from compress.scheduler import schedule

log = logging.getLogger(__name__)
_ids = itertools.count()


class _Seq:
    """One request inside the engine."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, handle: RequestHandle, tokenizer):
        self.id, self.prompt, self.params, self.handle = request_id, prompt, params, handle
        self.generator = params.generator()
        self.detok = Detokenizer(tokenizer, params.stop)
        self.slot = -1
        self.computed = 0  # tokens in this sequence's cache slot
        self.output: list[int] = []
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None


class Engine:
    """Continuous batching for a Hugging Face causal LM whose layers use HF's cache and attention interfaces
    (Llama, Qwen2, Mistral and their kin). The engine owns the model: while its thread runs, do not run the same
    model object elsewhere (during a step its attention layers read the engine's cache).

    Args:
        model, tokenizer: as ``compress.models.load`` returns them.
        max_num_seqs: sequences decoded together (cache slots).
        max_model_len: prompt plus new tokens of one request; default the model's context, at most 2048.
        max_batch_tokens: tokens one step runs: one per running sequence plus prompt chunks.
        num_threads: torch threads for the engine's thread (CPU).
        lean: run steps on ``compress.lean.LeanForward`` (Llama-family float32 models; default: wherever it
            applies) instead of the model's Hugging Face forward.
    """

    def __init__(self, model, tokenizer, *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 max_batch_tokens: int = 512, num_threads: int | None = None, lean: bool = True):
        limit = hf.context_length(model.config)
        max_model_len = min(limit, 2048) if max_model_len is None else max_model_len
        if not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len}: expected 1..{limit} (the model's context)")
        if max_num_seqs < 1 or max_batch_tokens <= max_num_seqs:
            raise ValueError(f"max_num_seqs={max_num_seqs}, max_batch_tokens={max_batch_tokens}: expected "
                             "max_num_seqs >= 1 and max_batch_tokens > max_num_seqs (each running sequence takes a "
                             "token of every step)")
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_model_len, self.max_batch_tokens = max_num_seqs, max_model_len, max_batch_tokens
        self.num_threads = num_threads
        self.cache = SlotKVCache.for_model(model, max_num_seqs, max_model_len)
        self.lean = LeanForward.for_model(model, max_model_len) if lean else None
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model, tokenizer)
        self.waiting: deque[_Seq] = deque()
        self.prefilling: list[_Seq] = []
        self.decoding: list[_Seq] = []  # decoding[i].slot == i: running sequences fill the first slots
        self.free_slots = set(range(max_num_seqs))
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "max_decode_batch": 0}
        self.decode_batch = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, generation tokens) after each step
        self.ttft_s = Histogram((0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.step_s = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    # -- requests -------------------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        """Queue a request; its events arrive on the returned handle. Raises ValueError if it cannot fit."""
        self._check(prompt, params)
        request_id = request_id or f"req-{next(_ids)}"
        handle = RequestHandle(request_id, len(prompt), cancel=lambda: self._inbox.put(("cancel", request_id)))
        self._inbox.put(("add", _Seq(request_id, list(prompt), params, handle, self.tokenizer)))
        return handle

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
        """Run requests to completion; steps on the calling thread unless the engine's thread is running."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters")
        for p, s in zip(prompts, params, strict=True):  # all or nothing: refuse before queueing any
            self._check(p, s)
        handles = [self.submit(p, s) for p, s in zip(prompts, params, strict=True)]
        if self._thread is None:
            with torch.inference_mode():
                while not all(h.done for h in handles):
                    self.step()
        return [h.result() for h in handles]

    def _check(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the engine's "
                             f"max_model_len of {self.max_model_len} tokens")

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last ``window_s`` seconds of steps."""
        recent = list(self._recent)
        now = time.perf_counter()
        inside = [(t, n) for t, n in recent if t >= now - window_s]
        if not inside:
            return 0.0
        before = next((n for t, n in reversed(recent) if t < now - window_s), 0)
        return (inside[-1][1] - before) / window_s

    # -- the thread -----------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Own the model on a background thread; from now on requests only go through ``submit``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="raypress-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        if self.num_threads:  # OpenMP keeps its thread count per calling thread
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while self._take_inbox(block=not (self.waiting or self.num_running)):
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
                return False
            if kind == "add":
                self.waiting.append(value)
                self.stats["requests"] += 1
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
        if not (self.waiting or self.num_running):
            return
        start = time.perf_counter()
        plan = schedule(len(self.decoding), [(s.id, len(s.prompt) - s.computed) for s in self.prefilling],
                        [(s.id, len(s.prompt)) for s in self.waiting], len(self.free_slots), self.max_batch_tokens)
        for _ in plan.admit:
            seq = self.waiting.popleft()
            seq.slot = max(self.free_slots)  # prompts fill from the top; running sequences from the bottom
            self.free_slots.discard(seq.slot)
            self.prefilling.append(seq)
        by_id = {s.id: s for s in self.prefilling}
        parts = [(s, 1) for s in self.decoding] + [(by_id[i], n) for i, n in plan.prefill]
        self._run(parts)
        if self.decoding:
            self.decode_batch.observe(len(self.decoding))
            self.stats["max_decode_batch"] = max(self.stats["max_decode_batch"], len(self.decoding))
        self.stats["steps"] += 1
        now = time.perf_counter()
        self.step_s.observe(now - start)
        self._recent.append((now, self.stats["generation_tokens"]))

    def _run(self, parts: list[tuple[_Seq, int]]) -> None:
        """One forward: a token for every running sequence and the planned prompt chunks; sample where a part ends
        a prompt or is a decode."""
        try:
            logits = self._forward(parts)
        except Exception as e:  # the step's requests fail with the reason; the engine goes on with new ones
            log.exception("raypress engine: a forward over %d requests failed", len(parts))
            for seq, _ in parts:
                self._finish(seq, None, error=f"{type(e).__name__}: {e}")
            return
        ready = []
        for row, (seq, n) in enumerate(parts):
            seq.computed += n
            if seq.computed >= len(seq.prompt):
                ready.append(row)
        if not ready:
            return
        seqs = [parts[r][0] for r in ready]
        try:
            tokens = sample(logits[ready], [s.params for s in seqs], [s.generator for s in seqs])
        except Exception:  # one row's parameters must not fail the others: sample row by row
            tokens = [self._sample_one(seq, logits[r]) for r, seq in zip(ready, seqs, strict=True)]
        for r, seq, token in zip(ready, seqs, tokens, strict=True):
            if token is not None:
                self._emit(seq, token, logits[r])

    def _sample_one(self, seq: _Seq, logits: torch.Tensor) -> int | None:
        try:
            return sample(logits[None], [seq.params], [seq.generator])[0]
        except Exception as e:
            log.exception("raypress engine: sampling failed for %s", seq.id)
            self._finish(seq, None, error=f"sampling failed: {type(e).__name__}: {e}")
            return None

    def _forward(self, parts: list[tuple[_Seq, int]]) -> torch.Tensor:
        """Logits [parts, vocab] at the last token of each part, from one packed forward."""
        n = len(self.decoding)
        tokens = [s.output[-1] for s, _ in parts[:n]]
        prefill = []
        for seq, count in parts[n:]:
            tokens += seq.prompt[seq.computed : seq.computed + count]
            prefill.append((seq.slot, seq.computed, count))
        layout = self.cache.plan([s.computed + 1 for s, _ in parts[:n]], prefill)
        if self.lean is not None:
            return self.lean(torch.tensor(tokens, device=self.device), layout, self.cache)
        with slot_attention(self.cache):
            out = self.model(input_ids=torch.tensor([tokens], device=self.device), position_ids=layout.positions,
                             attention_mask=layout.dummy_mask, cache=self.cache, use_cache=True,
                             logits_to_keep=layout.last_tokens)
        return out.logits[0]

    # -- results --------------------------------------------------------------------------------------------------

    def _emit(self, seq: _Seq, token: int, logits: torch.Tensor) -> None:
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.ttft_s.observe(now - seq.arrival)
            self.stats["prompt_tokens"] += len(seq.prompt)
            self._to_decoding(seq)
        if token in self.eos:
            self._finish(seq, "stop")
            return
        seq.output.append(token)
        self.stats["generation_tokens"] += 1
        logprobs = [logprobs_of(logits, token, seq.params.logprobs)] if seq.params.logprobs is not None else None
        if seq.detok.push(token):
            self._finish(seq, "stop", token=token, logprobs=logprobs)
        elif len(seq.output) >= seq.params.max_tokens:
            self._finish(seq, "length", token=token, logprobs=logprobs)
        else:
            seq.handle.publish(RequestOutput(seq.detok.release(), [token], logprobs, None, len(seq.output)))

    def _finish(self, seq: _Seq, reason: str | None, token: int | None = None, logprobs=None,
                error: str | None = None) -> None:
        text = seq.detok.release(final=True) if error is None else ""
        self._free(seq)
        seq.handle.publish(RequestOutput(text, [] if token is None else [token], logprobs, reason or "error",
                                         len(seq.output), error=error))

    def _cancel(self, request_id: str) -> None:
        for seq in itertools.chain(self.waiting, self.prefilling, self.decoding):
            if seq.id == request_id:
                self._free(seq)
                seq.handle.publish(RequestOutput("", [], None, "cancelled", len(seq.output)))
                return

    def _fail_all(self, message: str) -> None:
        for seq in list(itertools.chain(self.waiting, self.prefilling, self.decoding)):
            self._finish(seq, None, error=message)

    # -- slots ----------------------------------------------------------------------------------------------------

    def _to_decoding(self, seq: _Seq) -> None:
        """A prompt is done: move its cache to the first slot after the running sequences (swap with whoever is
        prefilling there), so that decode steps see slots 0..n-1 as one view."""
        self.prefilling.remove(seq)
        target = len(self.decoding)
        if seq.slot != target:
            other = next((s for s in self.prefilling if s.slot == target), None)
            if other is not None:
                self.cache.swap(seq.slot, target, seq.computed, other.computed)
                other.slot = seq.slot
            else:
                self.cache.move(seq.slot, target, seq.computed)
                self.free_slots.add(seq.slot)
                self.free_slots.discard(target)
            seq.slot = target
        self.decoding.append(seq)

    def _free(self, seq: _Seq) -> None:
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        if seq in self.decoding:
            last = self.decoding.pop()
            if last is not seq:  # the last running sequence fills the hole
                self.cache.move(last.slot, seq.slot, last.computed)
                self.decoding[seq.slot] = last
                last.slot, seq.slot = seq.slot, last.slot
        else:
            self.prefilling.remove(seq)
        self.free_slots.add(seq.slot)
        seq.slot = -1


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
