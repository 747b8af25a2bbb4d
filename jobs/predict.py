"""The stages of jobs.batch_infer's pipeline, one batch at a time: ``preprocess`` (template and tokenize, CPU
tasks), ``Predictor`` (the model actors) and ``postprocess`` (format the answers, CPU tasks).

Between stages a batch carries the input's columns plus internal ones: ``_ids`` (the prompt's token ids,
list<int32>), ``_params`` (the row's sampling settings, JSON), ``_error`` (why the row gets no answer, or "") and
``_out`` (the model's answer, JSON). A row with an error passes through the model untouched, and every row comes out.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pyarrow as pa

from compress import data, models
from engine.core import Engine
from engine.interface import EngineClient
from engine.request import Generation
from engine.sampling import SamplingParams
from jobs.inputs import TYPE_ERRORS
from jobs.params import PARAM_COLUMNS, PARAM_TYPES, is_null, row_params

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))  # OpenAI chat messages
INTERNAL = ("_ids", "_params", "_error", "_out", TYPE_ERRORS)


@functools.cache
def _tokenizer(model: str):
    return models.tokenizer_for(model)


def input_types(task: str, column: str) -> dict[str, pa.DataType]:
    """The types of the input columns a task reads (what a JSON input's values are typed as)."""
    if task != "generate":
        return {column: pa.string()}
    return {column: MESSAGES if column == "messages" else pa.string(), "messages": MESSAGES, **PARAM_TYPES}


def preprocess(table: pa.Table, model: str, task: str, column: str, context: int, defaults: dict) -> pa.Table:
    """Template and tokenize each row; a bad row gets its error here and skips the model."""
    tokenizer, _ = _tokenizer(model)
    wanted = [c for c in (column, "messages", TYPE_ERRORS, *PARAM_COLUMNS) if c in table.column_names]
    ids, params, errors = [], [], []
    for row in table.select(wanted).to_pylist():
        value = row.get(column)
        if value is None and task == "generate" and column != "messages":
            value = row.get("messages")  # rows may give a prompt or OpenAI chat messages
        try:
            if row.get(TYPE_ERRORS):
                raise ValueError(row[TYPE_ERRORS])
            text, templated = _row_text(value, column, tokenizer, task, chat=defaults.get("chat", False))
            row_ids = data.prompt_ids(tokenizer, text, templated)
            p = row_params(row, defaults, len(tokenizer)) if task == "generate" else None
            budget = p.max_tokens if p else 0
            if len(row_ids) + budget > context:
                raise ValueError(f"{len(row_ids)} prompt tokens + {budget} new tokens exceed the limit of {context} "
                                 "tokens (the model's context, or --max-model-len)")
            if task == "score" and len(row_ids) < 2:
                raise ValueError("scoring needs at least 2 tokens")
            ids.append(row_ids)
            params.append(p.to_json() if p else "")
            errors.append("")
        except (ValueError, TypeError) as e:
            ids.append([])
            params.append("")
            errors.append(str(e))
    return (table.append_column("_ids", pa.array(ids, pa.list_(pa.int32())))
            .append_column("_params", pa.array(params, pa.string()))
            .append_column("_error", pa.array(errors, pa.string())))


def _row_text(value, column: str, tokenizer, task: str, chat: bool = False) -> tuple[str, bool]:
    """The row's text, and whether the chat template made it."""
    if is_null(value):
        raise ValueError(f"column {column!r} is null")
    if isinstance(value, np.ndarray | list) and task == "generate":
        messages = [dict(m) if isinstance(m, dict) else m for m in value]
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                                   for m in messages):
            raise ValueError(f"column {column!r}: expected OpenAI chat messages [{{role, content}}, ...]")
        return data.chat_text(tokenizer, messages), True
    if not isinstance(value, str):
        raise TypeError(f"column {column!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"column {column!r} is empty")
    if chat:
        return data.chat_text(tokenizer, [{"role": "user", "content": value}]), True
    return value, False


class Predictor:
    """One model replica per actor. Maps a batch to its outputs; rows with an error pass through untouched.

    Generation and scoring go through the engine: every row of a call is queued at once and starts as soon as a
    slot is free, so a long row never holds up the short ones beside it. A row is scored by the log-probabilities of
    its own tokens, which the engine keeps from the prefill (what ``echo`` returns on /v1/completions), so the
    logits held at once are those of one prefill chunk, whatever the vocabulary. Embeddings encode the row's own
    text, as the serving app does.
    """

    def __init__(self, model: str, task: str, column: str, max_num_seqs: int, max_model_len: int,
                 threads: int | None = None, ledger=None):
        import torch

        self.threads, self.ledger = threads, ledger
        max_memory = None
        if torch.cuda.device_count() > 1:  # this actor holds several GPUs: shard the model's layers over them
            free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
            max_memory = models.plan_sharding(models.weights_bytes(model), free)
        self.model, self.tokenizer, self.kind = models.load(model, max_memory=max_memory)
        self.task, self.column, self.max_num_seqs, self.max_model_len = task, column, max_num_seqs, max_model_len
        self.engine: EngineClient | None = None

    def _engine(self, need: int) -> EngineClient:
        """The engine, with a KV cache as long as this call's longest row needs (in steps of 256 tokens, at most
        max_model_len): a batch of short rows does not pay memory for the longest row the job allows."""
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
        if self.task == "generate":
            for i, g in self._through_engine(ids, {i: SamplingParams.from_json(batch["_params"][i]) for i in ids},
                                             out).items():
                out["_out"][i] = json.dumps({"n": len(g.token_ids), "text": g.text, "finish_reason": g.finish_reason,
                                             "cached": g.num_cached_tokens})
            return
        if self.task == "score":  # the prompt log-probabilities the engine keeps in the prefill it runs anyway
            for i, g in self._through_engine(ids, dict.fromkeys(ids, SCORE_PARAMS), out).items():
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

    def _through_engine(self, ids: dict[int, list[int]], settings: dict[int, SamplingParams],
                        out: dict) -> dict[int, Generation]:
        """Every row's result from the engine, all queued at once; a row the engine refuses or fails gets its error
        in ``out`` and no result."""
        rows = list(ids)
        if not rows:
            return {}
        try:
            engine = self._engine(max(len(ids[i]) + p.max_tokens for i, p in settings.items()))
        except Exception as e:  # no engine for this call: every row gets the reason
            for i in rows:
                out["_error"][i] = f"model error: {type(e).__name__}: {e}"
            return {}
        runnable = []
        for i in rows:  # a row the engine refuses (a schema that does not compile) gets its error; the rest run
            try:
                engine.check(ids[i], settings[i])
                runnable.append(i)
            except ValueError as e:
                out["_error"][i] = str(e)
        try:
            results = engine.generate([ids[i] for i in runnable], [settings[i] for i in runnable])
        except Exception as e:  # the engine refused the call as a whole: every row gets the reason
            for i in runnable:
                out["_error"][i] = f"model error: {type(e).__name__}: {e}"
            return {}
        done = {}
        for i, g in zip(runnable, results, strict=True):
            if g.error:
                out["_error"][i] = f"model error: {g.error}"
            else:
                done[i] = g
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


OUTPUT_TYPES = {"generated_text": pa.string(), "num_generated_tokens": pa.int64(), "finish_reason": pa.string(),
                "logprob_sum": pa.float64(), "logprob_mean": pa.float64(), "perplexity": pa.float64(),
                "embedding": pa.list_(pa.float32()), "num_prompt_tokens": pa.int64(), "num_cached_tokens": pa.int64(),
                "error": pa.string()}


def postprocess(batch: dict, task: str, schema: pa.Schema) -> pa.Table:
    """Format the model's outputs into the job's columns and drop the internal ones. Every column gets its type
    from ``schema`` (the input's) or ``OUTPUT_TYPES``, so that all output files agree even where a block's values
    are all null."""
    errors = [e or None for e in batch["_error"]]
    outs = [json.loads(o) if o and not errors[i] else None for i, o in enumerate(batch["_out"])]
    if task == "generate":
        batch["generated_text"] = [o and o["text"] for o in outs]
        batch["num_generated_tokens"] = [o and o["n"] for o in outs]
        batch["finish_reason"] = [o and o["finish_reason"] for o in outs]
        batch["num_cached_tokens"] = [o and o["cached"] for o in outs]
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


def _array(values, type_: pa.DataType | None) -> pa.Array:
    if isinstance(values, np.ndarray):
        values = list(values) if values.dtype == object else values.tolist()
    if type_ is not None and not pa.types.is_floating(type_):  # numpy holds a null as NaN
        values = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    try:
        return pa.array(values, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a parquet input whose files disagree: keep the batch's own type
        return pa.array(values)
