"""The stages of jobs.batch_infer's pipeline, one batch at a time: ``preprocess`` (template and tokenize, CPU
tasks), ``Predictor`` (the model actors) and ``postprocess`` (format the answers, CPU tasks).

Between stages a batch carries the input's columns plus internal ones: ``_ids`` (the prompt's token ids,
list<int32>), ``_params`` (the row's sampling settings, JSON), ``_n`` (its samples), ``_tools`` (its tool plan,
JSON, or ""), ``_error`` (why the row gets no answer, or "") and ``_out`` (the model's answer, JSON). A row with an
error passes through the model untouched, and every row comes out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math

import numpy as np
import pyarrow as pa

from compress import data, models
from engine.core import Engine
from engine.interface import EngineClient
from engine.request import Generation
from engine.sampling import SamplingParams
from jobs import storage
from jobs.inputs import TYPE_ERRORS
from jobs.params import PARAM_COLUMNS, PARAM_TYPES, is_null, row_n, row_params, row_tools
from jobs.placement import warn_if_gpus_idle
from jobs.tools import ToolPlan

log = logging.getLogger("jobs.batch_infer")

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()),  # OpenAI chat messages; an
                                ("tool_calls", pa.string()),  # assistant's calls (OpenAI's list, as JSON text)
                                ("tool_call_id", pa.string())]))  # and a tool message's answer to one
INTERNAL = ("_ids", "_params", "_n", "_tools", "_error", "_out", TYPE_ERRORS)


@functools.cache
def _tokenizer(model: str):
    return models.tokenizer_for(storage.local_model(model))


def input_types(task: str, column: str) -> dict[str, pa.DataType]:
    """The types of the input columns a task reads (what a JSON input's values are typed as)."""
    if task != "generate":
        return {column: pa.string()}
    return {column: MESSAGES if column == "messages" else pa.string(), "messages": MESSAGES, **PARAM_TYPES}


def preprocess(table: pa.Table, model: str, task: str, column: str, context: int, defaults: dict) -> pa.Table:
    """Template and tokenize each row; a bad row gets its error here and skips the model."""
    tokenizer, _ = _tokenizer(model)
    wanted = [c for c in (column, "messages", TYPE_ERRORS, *PARAM_COLUMNS) if c in table.column_names]
    ids, params, ns, tools, errors = [], [], [], [], []
    for row in table.select(wanted).to_pylist():
        value = row.get(column)
        if value is None and task == "generate" and column != "messages":
            value = row.get("messages")  # rows may give a prompt or OpenAI chat messages
        try:
            if row.get(TYPE_ERRORS):
                raise ValueError(row[TYPE_ERRORS])
            p = row_params(row, defaults, len(tokenizer)) if task == "generate" else None
            plan = row_tools(row, tokenizer) if task == "generate" else None
            if plan is not None and plan.guided is not None:
                p = dataclasses.replace(p, guided=plan.guided)
            text, templated = _row_text(value, column, tokenizer, task, chat=defaults.get("chat", False), tools=plan)
            row_ids = data.prompt_ids(tokenizer, text, templated)
            budget = p.max_tokens if p else 0
            if len(row_ids) + budget > context:
                raise ValueError(f"{len(row_ids)} prompt tokens + {budget} new tokens exceed the limit of {context} "
                                 "tokens (the model's context, or --max-model-len)")
            if task == "score" and len(row_ids) < 2:
                raise ValueError("scoring needs at least 2 tokens")
            done = (row_ids, p.to_json() if p else "", row_n(row) if p else 1,
                    json.dumps(dataclasses.asdict(plan)) if plan else "", "")
        except (ValueError, TypeError) as e:
            done = ([], "", 1, "", str(e))
        for out, value in zip((ids, params, ns, tools, errors), done, strict=True):
            out.append(value)
    return (table.append_column("_ids", pa.array(ids, pa.list_(pa.int32())))
            .append_column("_params", pa.array(params, pa.string()))
            .append_column("_n", pa.array(ns, pa.int64()))
            .append_column("_tools", pa.array(tools, pa.string()))
            .append_column("_error", pa.array(errors, pa.string())))


def _row_text(value, column: str, tokenizer, task: str, chat: bool = False,
              tools: ToolPlan | None = None) -> tuple[str, bool]:
    """The row's text, and whether the chat template made it (always, for a row with tools)."""
    if is_null(value):
        raise ValueError(f"column {column!r} is null")
    if isinstance(value, np.ndarray | list) and task == "generate":
        messages = [_message(m, column) for m in value]
        if not messages:
            raise ValueError(f"column {column!r}: expected OpenAI chat messages [{{role, content}}, ...]")
        if tools is not None:
            messages, kwargs = tools.messages(messages)
            return data.chat_text(tokenizer, messages, **kwargs), True
        plain = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]  # no tools: text only
        return data.chat_text(tokenizer, plain), True
    if not isinstance(value, str):
        raise TypeError(f"column {column!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"column {column!r} is empty")
    if chat or tools is not None:
        return _row_text([{"role": "user", "content": value}], column, tokenizer, task, tools=tools)
    return value, False


def _message(m, column: str) -> dict:
    """One chat message of a row: role and content (text; none for an assistant's tool calls), the calls as
    OpenAI's list or its JSON text, a tool message's tool_call_id. Empty fields are left out."""
    m = {k: v for k, v in (m.items() if isinstance(m, dict) else ()) if not is_null(v)}
    calls = m.get("tool_calls")
    if isinstance(calls, str):
        try:
            m["tool_calls"] = calls = json.loads(calls)
        except ValueError:
            calls = None
    if not (m.get("role") and (isinstance(m.get("content"), str) or (isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)))):
        raise ValueError(f"column {column!r}: expected OpenAI chat messages [{{role, content}}, ...] (an "
                         f"assistant's tool_calls as OpenAI's list), got {m!r}")
    return m


class Predictor:
    """One model replica per actor. Maps a batch to its outputs; rows with an error pass through untouched.

    Generation and scoring go through the engine: every row of a call is queued at once and starts as soon as a
    slot is free, so a long row never holds up the short ones beside it. A row is scored by the log-probabilities of
    its own tokens, which the engine keeps from the prefill (what ``echo`` returns on /v1/completions), so the
    logits held at once are those of one prefill chunk, whatever the vocabulary. Embeddings encode the row's own
    text, as the serving app does.
    """

    def __init__(self, model: str, task: str, column: str, max_num_seqs: int, max_model_len: int,
                 threads: int | None = None, ledger=None, vllm: dict | None = None):
        """``model``: also a URI, copied to this node once (jobs.storage.local_model). ``vllm``: run on vLLM
        (engine.vllm) with these settings (``tensor_parallel_size``, ``dtype``) instead of raypress's engine, on the
        model's folder or its compressed-tensors export (jobs.export.for_vllm; the driver made it first)."""
        import torch

        model = storage.local_model(model)
        self.path, self.threads, self.ledger, self.vllm = model, threads, ledger, vllm
        self.task, self.column, self.max_num_seqs, self.max_model_len = task, column, max_num_seqs, max_model_len
        self.engine: EngineClient | None = None
        warn_if_gpus_idle("--num-gpus-per-actor 1 (the Batch API: batch_gpus_per_actor)", log)
        if vllm is not None:  # vLLM loads the weights itself, once, when the first call needs the engine
            return
        max_memory = None
        if torch.cuda.device_count() > 1:  # this actor holds several GPUs: shard the model's layers over them
            free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
            max_memory = models.plan_sharding(models.weights_bytes(model), free)
        self.model, self.tokenizer, self.kind = models.load(model, max_memory=max_memory)

    def _engine(self, need: int) -> EngineClient:
        """The engine, with a KV cache as long as this call's longest row needs (in steps of 256 tokens, at most
        max_model_len): a batch of short rows does not pay memory for the longest row the job allows."""
        if self.vllm is not None:  # one engine for the job's longest row: vLLM's start is slow, its cache paged
            if self.engine is None:
                from engine.vllm import VllmEngine
                from jobs.export import for_vllm

                self.engine = VllmEngine(for_vllm(self.path), max_num_seqs=self.max_num_seqs,
                                         max_model_len=self.max_model_len, dtype=self.vllm.get("dtype"),
                                         tensor_parallel_size=self.vllm.get("tensor_parallel_size", 1))
            return self.engine
        if self.engine is None or self.engine.max_model_len < need:
            length = min(self.max_model_len, -(-need // 256) * 256)
            self.engine = None  # the old cache goes before the new one is made
            self.engine = Engine(self.model, self.tokenizer, max_num_seqs=self.max_num_seqs, max_model_len=length,
                                 max_batch_tokens=max(512, 2 * self.max_num_seqs))
        return self.engine

    def __call__(self, batch: dict) -> dict:
        """The batch's outputs. A call that killed its actor before (Ray retries it on the restarted actor) runs
        row by row, and a row that was running when the actor died gets an error instead of a third try: one row
        that kills its actor every time (out of memory, a crash in a kernel) costs its own answer, not the job."""
        import ray

        if self.threads:  # per call: OpenMP keeps the thread count per calling thread
            import torch

            torch.set_num_threads(self.threads)
        n = len(batch["_ids"])
        out = {"_out": np.array([""] * n, dtype=object), "_error": batch["_error"].copy()}
        todo = [i for i in range(n) if not batch["_error"][i]]
        key = _call_key(batch) if self.ledger is not None else None
        past = ray.get(self.ledger.begin.remote(key)) if key else {"deaths": 0, "killed": []}
        if not past["deaths"]:
            self._run(batch, todo, out)
        else:
            for i in todo:
                deaths_here = past["killed"].count(i)
                if deaths_here or past["deaths"] > MAX_DEATHS_PER_CALL:
                    out["_error"][i] = (f"model error: the model actor died {max(deaths_here, 1)} time(s) running "
                                        "this row (out of memory, or a crash in the model's code); not tried again")
                    continue
                ray.get(self.ledger.running.remote(key, i))
                self._run(batch, [i], out)
        if key:
            self.ledger.done.remote(key)
        batch.update(out)
        return batch

    def _run(self, batch: dict, todo: list[int], out: dict) -> None:
        import torch

        ids = {i: [int(t) for t in batch["_ids"][i]] for i in todo}
        if self.task == "generate":  # a row's n samples share its prompt: the prefix cache prefills it once
            settings = {}
            for i in ids:
                p = SamplingParams.from_json(batch["_params"][i])
                settings |= {(i, k): p.for_sample(k) for k in range(int(batch["_n"][i]))}
            done = self._through_engine({key: ids[key[0]] for key in settings}, settings, out)
            for i in ids:
                samples = [done.get((i, k)) for k in range(int(batch["_n"][i]))]
                if all(samples):  # else the row has its error
                    out["_out"][i] = json.dumps([{"n": len(g.token_ids), "text": g.text,
                                                  "finish_reason": g.finish_reason, "cached": g.num_cached_tokens}
                                                 for g in samples])
            return
        if self.task == "score":  # the prompt log-probabilities the engine keeps in the prefill it runs anyway
            for (i, _), g in self._through_engine({(i, 0): ids[i] for i in ids}, dict.fromkeys(
                    ((i, 0) for i in ids), SCORE_PARAMS), out).items():
                scores = [p.logprob for p in g.prompt_logprobs[1:]]
                total = math.fsum(scores)
                out["_out"][i] = json.dumps({"sum": total, "mean": total / len(scores)})
            return
        todo = sorted(todo, key=lambda i: len(ids[i]))  # similar lengths together: little padding
        for start in range(0, len(todo), self.max_num_seqs):
            rows = todo[start : start + self.max_num_seqs]
            try:
                with torch.inference_mode():
                    results = models.encode(self.model, self.tokenizer, [str(batch[self.column][i]) for i in rows])
                for i, r in zip(rows, results.tolist(), strict=True):
                    out["_out"][i] = json.dumps(r)
            except Exception as e:  # a batch the model cannot take: record it on its rows and go on
                for i in rows:
                    out["_error"][i] = f"model error: {type(e).__name__}: {e}"

    def _through_engine(self, ids: dict[tuple[int, int], list[int]], settings: dict[tuple[int, int], SamplingParams],
                        out: dict) -> dict[tuple[int, int], Generation]:
        """Every (row, sample)'s result from the engine, all queued at once; a row whose sample the engine refuses
        or fails gets its error in ``out``, and that sample no result."""
        keys = list(ids)
        if not keys:
            return {}

        def fail(key, why: str) -> None:
            out["_error"][key[0]] = why

        try:
            engine = self._engine(max(len(ids[k]) + p.max_tokens for k, p in settings.items()))
        except Exception as e:  # no engine for this call: every row gets the reason
            for k in keys:
                fail(k, f"model error: {type(e).__name__}: {e}")
            return {}
        runnable = []
        for k in keys:  # a row the engine refuses (a schema that does not compile) gets its error; the rest run
            try:
                engine.check(ids[k], settings[k])
                runnable.append(k)
            except ValueError as e:
                fail(k, str(e))
        try:
            results = engine.generate([ids[k] for k in runnable], [settings[k] for k in runnable])
        except Exception as e:  # the engine refused the call as a whole: every row gets the reason
            for k in runnable:
                fail(k, f"model error: {type(e).__name__}: {e}")
            return {}
        done = {}
        for k, g in zip(runnable, results, strict=True):
            if g.error:
                fail(k, f"model error: {g.error}")
            else:
                done[k] = g
        return done


SCORE_PARAMS = SamplingParams(max_tokens=1, prompt_logprobs=0)  # score: each prompt token's log-probability


MAX_DEATHS_PER_CALL = 4  # after this many actor deaths in one call, its rows not yet answered get an error


class CallLedger:
    """Which model calls were started and not finished, kept by one small actor of the job's driver across the
    restarts of the model actors: a call begun again without having finished killed its actor, and the row it was
    running then (in row-by-row mode) is the one to blame."""

    def __init__(self):
        self.calls: dict[str, dict] = {}

    def begin(self, key: str) -> dict:
        call = self.calls.setdefault(key, {"attempts": 0, "running": None, "killed": []})
        if call["running"] is not None:
            call["killed"].append(call["running"])
        call["attempts"] += 1
        call["running"] = None
        return {"deaths": call["attempts"] - 1, "killed": list(call["killed"])}

    def running(self, key: str, row: int) -> None:
        self.calls[key]["running"] = row

    def done(self, key: str) -> None:
        self.calls.pop(key, None)


def _call_key(batch: dict) -> str:
    """The same for every try of one call, different for every other: the rows' source files and numbers."""
    import hashlib

    h = hashlib.sha256()
    if "source_file" in batch and "source_row" in batch:
        h.update(repr((batch["source_file"].tolist(), batch["source_row"].tolist())).encode())
    else:
        for ids in batch["_ids"]:
            h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


CHOICES = pa.list_(pa.struct([("text", pa.string()), ("finish_reason", pa.string()),
                               ("num_generated_tokens", pa.int64()), ("tool_calls", pa.string())]))  # a row's n samples
OUTPUT_TYPES = {"generated_text": pa.string(), "num_generated_tokens": pa.int64(), "finish_reason": pa.string(),
                "logprob_sum": pa.float64(), "logprob_mean": pa.float64(), "perplexity": pa.float64(),
                "embedding": pa.list_(pa.float32()), "num_prompt_tokens": pa.int64(), "num_cached_tokens": pa.int64(),
                "tool_calls": pa.string(), "choices": CHOICES, "error": pa.string()}


def postprocess(batch: dict, task: str, schema: pa.Schema) -> pa.Table:
    """Format the model's outputs into the job's columns and drop the internal ones. Every column gets its type
    from ``schema`` (the input's) or ``OUTPUT_TYPES``, so that all output files agree even where a block's values
    are all null."""
    errors = [e or None for e in batch["_error"]]
    outs = [json.loads(o) if o and not errors[i] else None for i, o in enumerate(batch["_out"])]
    if task == "generate":
        _generated(batch, outs, schema)
    elif task == "score":
        batch["logprob_sum"] = [o["sum"] if o else None for o in outs]
        batch["logprob_mean"] = [o["mean"] if o else None for o in outs]
        batch["perplexity"] = [math.exp(-o["mean"]) if o else None for o in outs]
    else:
        batch["embedding"] = outs
    batch["num_prompt_tokens"] = [None if e else len(i) for i, e in zip(batch["_ids"], errors, strict=True)]
    batch["error"] = errors
    for key in INTERNAL:
        batch.pop(key, None)
    types = {f.name: f.type for f in schema} | OUTPUT_TYPES
    return pa.table({k: _array(v, types.get(k)) for k, v in batch.items()})


def _generated(batch: dict, outs: list, schema: pa.Schema) -> None:
    """A generate batch's answer columns: the first sample's text, finish reason and tokens (all samples' tokens in
    num_generated_tokens); with a ``tools`` input column, tool_calls (OpenAI's list as JSON text, the first sample's;
    finish_reason tool_calls); with an ``n`` input column, choices: every sample."""
    samples = []
    for out, plan in zip(outs, batch["_tools"], strict=True):
        plan = ToolPlan(**json.loads(plan)) if out and plan else None
        rows = []
        for s in out or ():
            calls = plan.parse(s["text"]) if plan else None
            rows.append({"text": s["text"], "finish_reason": "tool_calls" if calls else s["finish_reason"],
                         "num_generated_tokens": s["n"], "tool_calls": json.dumps(calls) if calls else None})
        samples.append(rows)
    batch["generated_text"] = [s[0]["text"] if s else None for s in samples]
    batch["num_generated_tokens"] = [sum(c["num_generated_tokens"] for c in s) if s else None for s in samples]
    batch["finish_reason"] = [s[0]["finish_reason"] if s else None for s in samples]
    batch["num_cached_tokens"] = [o[0]["cached"] if o else None for o in outs]  # the prompt's, once
    if "tools" in schema.names:
        batch["tool_calls"] = [s[0]["tool_calls"] if s else None for s in samples]
    if "n" in schema.names:
        batch["choices"] = [s or None for s in samples]


def _array(values, type_: pa.DataType | None) -> pa.Array:
    if isinstance(values, np.ndarray):
        values = list(values) if values.dtype == object else values.tolist()
    if type_ is not None and not pa.types.is_floating(type_):  # numpy holds a null as NaN
        values = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    try:
        return pa.array(values, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a parquet input whose files disagree: keep the batch's own type
        return pa.array(values)
