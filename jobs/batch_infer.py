"""Offline batch inference on Ray Data: every input row comes out, with the model's answer or an error.

    python -m jobs.batch_infer --model smollm2-135m --input prompts.jsonl --output out/ --task generate
    python -m jobs.batch_infer --model minilm-l6 --input docs/ --output emb/ --task embed --column text
    ray job submit --working-dir . -- python -m jobs.batch_infer --model artifacts/sweep/chosen --input s3://b/in/ ...

Pipeline: read (parquet, jsonl or csv; a file, folder or glob; any filesystem pyarrow knows) -> template and
tokenize (CPU tasks) -> model actors (--num-actors, --num-gpus-per-actor; each batch sorted by length so padding
wastes little) -> decode and format (CPU tasks) -> parquet files in OUTPUT.

Columns: generate adds generated_text, num_generated_tokens, finish_reason (per-row max_tokens, temperature, top_p,
seed, stop columns override the flags); embed adds embedding (list<float32>, pooled as the model's
sentence-transformers config says); score adds logprob_sum, logprob_mean, perplexity. Every task adds
num_prompt_tokens, and error: null or why that row got no answer. Output rows = input rows. --resume skips rows
already in OUTPUT (by --id-column, or by the row_index this job adds in input order). OUTPUT and INPUT are local
paths or URIs of any filesystem pyarrow knows.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from compress import models
from compress.engine import Engine
from compress.sampling import SamplingParams
from jobs import storage
from jobs.inputs import TYPE_ERRORS, read_input

log = logging.getLogger("jobs.batch_infer")
TASKS = ("generate", "embed", "score")
PARAM_COLUMNS = ("max_tokens", "temperature", "top_p", "seed", "stop")
ROW_INDEX = "row_index"


# ---------------------------------------------------------------------------------------------------------------
# Per-batch functions (pure): batches are dicts of numpy arrays


@functools.cache
def _tokenizer(model: str):
    return models.tokenizer_for(model)


def preprocess(batch: dict, model: str, task: str, column: str, context: int, defaults: dict) -> dict:
    """Template and tokenize each row; a bad row gets its error here and skips the model."""
    tokenizer, kind = _tokenizer(model)
    n = len(next(iter(batch.values())))
    ids, errors, params = [], [], []
    for i in range(n):
        value = batch[column][i] if column in batch else None
        if _is_null(value) and task == "generate" and column != "messages" and "messages" in batch:
            value = batch["messages"][i]  # rows may give a prompt or OpenAI chat messages
        try:
            if TYPE_ERRORS in batch and batch[TYPE_ERRORS][i]:
                raise ValueError(batch[TYPE_ERRORS][i])
            text = _row_text(value, column, tokenizer, task, chat=defaults.get("chat", False))
            row_ids = tokenizer(text, add_special_tokens=task != "generate")["input_ids"]
            p = _row_params(batch, i, defaults) if task == "generate" else None
            budget = p.max_tokens if p else 0
            if len(row_ids) + budget > context:
                raise ValueError(f"{len(row_ids)} prompt tokens + {budget} new tokens exceed the limit of {context} "
                                 "tokens (the model's context, or --max-model-len)")
            if task == "score" and len(row_ids) < 2:
                raise ValueError("scoring needs at least 2 tokens")
            ids.append(json.dumps(row_ids))
            params.append(json.dumps(p.__dict__) if p else "")
            errors.append("")
        except (ValueError, TypeError) as e:
            ids.append("[]")
            params.append("")
            errors.append(str(e))
    batch["_ids"], batch["_params"], batch["_error"] = np.array(ids), np.array(params), np.array(errors)
    return batch


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_text(value, column: str, tokenizer, task: str, chat: bool = False) -> str:
    if _is_null(value):
        raise ValueError(f"column {column!r} is null")
    if isinstance(value, np.ndarray | list) and task == "generate":
        messages = [dict(m) for m in value]
        if not messages or not all(isinstance(m.get("content"), str) and m.get("role") for m in messages):
            raise ValueError(f"column {column!r}: expected OpenAI chat messages [{{role, content}}, ...]")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(value, str):
        raise TypeError(f"column {column!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"column {column!r} is empty")
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": value}], tokenize=False,
                                             add_generation_prompt=True)
    return value


def _row_params(batch: dict, i: int, defaults: dict) -> SamplingParams:
    values = dict(defaults)
    values.pop("chat", None)
    for key in PARAM_COLUMNS:
        if key in batch:
            v = batch[key][i]
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                values[key] = v
    stop = values.get("stop")
    values["stop"] = () if stop is None else (stop,) if isinstance(stop, str) else tuple(str(s) for s in stop)
    values["max_tokens"] = int(values["max_tokens"])
    values["seed"] = None if values.get("seed") is None else int(values["seed"])
    values["temperature"], values["top_p"] = float(values["temperature"]), float(values["top_p"])
    return SamplingParams(**values)


class Predictor:
    """One model replica per actor. Maps a batch to its outputs; rows with an error pass through untouched.

    Generation goes through the engine: every row of a call is queued at once and starts as soon as a slot is free,
    so a long row never holds up the short ones beside it.
    """

    def __init__(self, model: str, task: str, max_num_seqs: int, max_model_len: int, threads: int | None = None,
                 fail_after: int = 0, fault_marker: str = ""):
        import torch

        self.threads = threads
        max_memory = None
        if torch.cuda.device_count() > 1:  # this actor holds several GPUs: shard the model's layers over them
            free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
            max_memory = models.plan_sharding(models.weights_bytes(model), free)
        self.model, self.tokenizer, self.kind = models.load(model, max_memory=max_memory)
        self.task, self.max_num_seqs = task, max_num_seqs
        self.engine = Engine(self.model, self.tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             max_batch_tokens=max(256, 2 * max_num_seqs)) if task == "generate" else None
        self.fail_after, self.fault_marker, self.batches = fail_after, fault_marker, 0

    def __call__(self, batch: dict) -> dict:
        import torch

        if self.threads:  # per call: OpenMP keeps the thread count per calling thread
            torch.set_num_threads(self.threads)
        self.batches += 1
        _maybe_fail(self.fail_after, self.batches, self.fault_marker)
        n = len(batch["_ids"])
        out = {"_out": np.array([""] * n, dtype=object), "_error": batch["_error"].copy()}
        todo = [i for i in range(n) if not batch["_error"][i]]
        ids = {i: json.loads(batch["_ids"][i]) for i in todo}
        if self.task == "generate":
            self._generate(ids, batch["_params"], out)
            batch.update(out)
            return batch
        todo.sort(key=lambda i: len(ids[i]))  # similar lengths together: little padding
        for start in range(0, len(todo), self.max_num_seqs):
            rows = todo[start : start + self.max_num_seqs]
            try:
                with torch.inference_mode():
                    results = self._encode_or_score([ids[i] for i in rows])
                for i, r in zip(rows, results, strict=True):
                    out["_out"][i] = json.dumps(r)
            except Exception as e:  # a batch the model cannot take: record it on its rows and go on
                for i in rows:
                    out["_error"][i] = f"model error: {type(e).__name__}: {e}"
        batch.update(out)
        return batch

    def _generate(self, ids: dict[int, list[int]], params: np.ndarray, out: dict) -> None:
        rows = list(ids)
        if not rows:
            return
        row_params = [SamplingParams(**{**p, "stop": tuple(p["stop"])}) for p in (json.loads(params[i]) for i in rows)]
        try:
            results = self.engine.generate([ids[i] for i in rows], row_params)
        except Exception as e:  # the engine refused the call as a whole: every row gets the reason
            results = [None] * len(rows)
            for i in rows:
                out["_error"][i] = f"model error: {type(e).__name__}: {e}"
        for i, g in zip(rows, results, strict=True):
            if g is not None and g.error:
                out["_error"][i] = f"model error: {g.error}"
            elif g is not None:
                out["_out"][i] = json.dumps({"ids": g.token_ids, "text": g.text, "finish_reason": g.finish_reason})

    def _encode_or_score(self, ids: list[list[int]]) -> list:
        import torch

        if self.task == "embed":
            texts = [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
            return models.encode(self.model, self.tokenizer, texts).tolist()
        return _score(self.model, ids, self.tokenizer.pad_token_id or 0, torch)


def _score(model, ids: list[list[int]], pad: int, torch) -> list[dict]:
    width = max(map(len, ids))
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    device = next(model.parameters()).device
    logp = torch.log_softmax(model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float(), -1)
    token_lp = logp[:, :-1].gather(-1, x[:, 1:, None].to(device))[..., 0].cpu() * mask[:, 1:]
    sums, counts = token_lp.sum(1), mask[:, 1:].sum(1)
    return [{"sum": float(s), "mean": float(s / c)} for s, c in zip(sums, counts, strict=True)]


def _maybe_fail(fail_after: int, batches: int, marker: str) -> None:
    """Test hook (RAYPRESS_FAULT_AFTER_BATCHES and RAYPRESS_FAULT_MARKER where the job starts): the first actor
    to reach batch ``fail_after`` dies, once; the marker file records that it happened."""
    if fail_after and batches == fail_after and marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)


def postprocess(batch: dict, model: str, task: str) -> dict:
    """Decode and format the model's outputs into the job's columns; drop the internal ones."""
    errors = [e or None for e in batch["_error"]]
    outs = [json.loads(o) if o and not errors[i] else None for i, o in enumerate(batch["_out"])]
    if task == "generate":
        texts, n_gen, finish = [], [], []
        for o in outs:
            if o is None:
                texts.append(None), n_gen.append(None), finish.append(None)
                continue
            texts.append(o["text"]), n_gen.append(len(o["ids"])), finish.append(o["finish_reason"])
        batch["generated_text"] = np.array(texts, dtype=object)
        batch["num_generated_tokens"] = np.array(n_gen, dtype=object)
        batch["finish_reason"] = np.array(finish, dtype=object)
    elif task == "embed":
        embedding = pa.array([o for o in outs], type=pa.list_(pa.float32()))  # list<float32>, not a tensor type
    else:
        batch["logprob_sum"] = np.array([o["sum"] if o else None for o in outs], dtype=object)
        batch["logprob_mean"] = np.array([o["mean"] if o else None for o in outs], dtype=object)
        batch["perplexity"] = np.array([math.exp(-o["mean"]) if o else None for o in outs], dtype=object)
    batch["num_prompt_tokens"] = np.array([len(json.loads(i)) if not e else None
                                           for i, e in zip(batch["_ids"], errors, strict=True)], dtype=object)
    batch["error"] = np.array(errors, dtype=object)
    for key in ("_ids", "_params", "_error", "_out", TYPE_ERRORS):
        batch.pop(key, None)
    if task != "embed":
        return batch
    table = pa.table({k: pa.array(v.tolist() if v.dtype == object else v) for k, v in batch.items()})
    return table.append_column("embedding", embedding)


# ---------------------------------------------------------------------------------------------------------------
# Resume and summary


def done_ids(output: str, id_column: str) -> set:
    """Ids already written by earlier runs; an unreadable (half-written) file is removed so its rows are redone."""
    fs, root = storage.resolve(output)
    ids = set()
    for f in storage.files(fs, root, ".parquet"):
        try:
            ids.update(pq.read_table(f, columns=[id_column], filesystem=fs).column(id_column).to_pylist())
        except (pa.ArrowInvalid, OSError) as e:
            log.warning("removing unreadable output %s (%s); its rows will be redone", f, e)
            fs.delete_file(f)
    return ids


def summarize(output: str, task: str, seconds: float) -> str:
    fs, root = storage.resolve(output)
    columns = ["error"] + (["num_prompt_tokens", "num_generated_tokens"] if task == "generate" else [])
    table = pads.dataset(storage.files(fs, root, ".parquet"), filesystem=fs, format="parquet").to_table(columns)
    errors = table.column("error").to_pylist()
    n, bad = table.num_rows, sum(e is not None for e in errors)
    tin = sum(x or 0 for x in table.column("num_prompt_tokens").to_pylist()) if task == "generate" else 0
    tout = sum(x or 0 for x in table.column("num_generated_tokens").to_pylist()) if task == "generate" else 0
    return (f"{n} rows ({n - bad} ok, {bad} errors), {tin} tokens in, {tout} tokens out, {seconds:.1f} s, "
            f"{n / seconds:.2f} rows/s, {(tin + tout) / seconds:.1f} tokens/s -> {output}")


# ---------------------------------------------------------------------------------------------------------------
# The job


def main(
    *,
    model: str,
    input: str,
    output: str,
    task: str = "generate",
    column: str | None = None,
    id_column: str | None = None,
    resume: bool = False,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    threads_per_actor: int | None = None,
    actor_resources: str | None = None,
    batch_size: int = 16,
    max_model_len: int = 2048,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    chat: bool = False,
) -> int:
    """Run a model over a dataset with Ray Data and write every row, answered or with its error, to parquet.

    Args:
        model: built-in name, model folder, raypress artifact (e.g. a sweep's chosen/), or hub id.
        input: parquet, jsonl or csv: a file, a folder, or a glob; local or any pyarrow filesystem (s3://...).
        output: folder for the output parquet files: a local path or a URI (s3://, gs://, file://).
        task: generate (text), embed (sentence embeddings) or score (log-probability and perplexity of the text).
        column: input column: default prompt (or messages, in OpenAI chat form) for generate, text otherwise.
        id_column: column that identifies rows, for --resume; default: a row_index added in input order.
        resume: skip rows already written to OUTPUT by an interrupted run.
        num_actors: model actors (replicas) in the pool.
        num_gpus_per_actor: GPUs per actor: fractional to share one, several to shard a big model across them.
        cpus_per_actor: CPUs per actor (fractional leaves room for the read/write tasks on small machines).
        threads_per_actor: torch threads per actor; default: what Ray gives an actor of that many CPUs.
        actor_resources: JSON of custom Ray resources per actor, e.g. '{"accelerator": 1}'.
        batch_size: rows per model batch; for generate, the sequences each actor's engine decodes together.
        max_model_len: generate: prompt + new tokens of one row (at most the model's context); each actor's KV
            cache holds batch_size x this many tokens. Longer rows get an error.
        max_tokens: default new tokens per row (a max_tokens column overrides it per row).
        temperature: default sampling temperature; 0 is greedy.
        top_p: default nucleus sampling threshold.
        seed: default sampling seed.
        stop: default stop strings.
        chat: wrap each prompt in the model's chat template as one user message (instruction-tuned models).
    """
    import ray

    start = time.perf_counter()
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {TASKS}")
    out_fs, out_dir = storage.resolve(output)
    table = read_input(input)
    column = column or _default_column(task, table.column_names)
    if column not in table.column_names:
        raise ValueError(f"input has no column {column!r}; its columns: {table.column_names} (use --column)")
    kind = models.kind_of(model)
    if (task == "embed") != (kind == models.ENCODER):
        raise ValueError(f"--task {task} does not fit {model!r}, a {kind} model: encoders embed; causal LMs "
                         "generate and score")
    id_column = _with_ids(table, id_column)
    if id_column == ROW_INDEX and ROW_INDEX not in table.column_names:
        table = table.append_column(ROW_INDEX, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    existing = storage.files(out_fs, out_dir, ".parquet")
    if existing and not resume:
        raise ValueError(f"output {output!r} already holds {len(existing)} parquet file(s); pass --resume to "
                         "continue that run, or choose another folder")
    if resume:
        done = done_ids(output, id_column)
        if done:
            keep = pa.compute.invert(pa.compute.is_in(table.column(id_column), value_set=pa.array(list(done))))
            todo = sum(keep.to_pylist())
            log.info("resume: %d of %d rows already written; %d to go", len(done), table.num_rows, todo)
            table = table.filter(keep)
    if table.num_rows:
        if not ray.is_initialized():
            ray.init(configure_logging=False)
        defaults = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                    "stop": tuple(stop or ()), "chat": chat}
        resources = json.loads(actor_resources) if actor_resources else {}
        _run_pipeline(ray, table, model, task, column, defaults, (out_fs, out_dir), num_actors, num_gpus_per_actor,
                      cpus_per_actor, threads_per_actor, resources, batch_size, max_model_len)
    print(summarize(output, task, time.perf_counter() - start))
    return 0


def _run_pipeline(ray, table, model, task, column, defaults, out, num_actors, num_gpus, num_cpus, threads,
                  resources, batch_size, max_model_len) -> None:
    context = _context_length(model)
    if task == "generate":
        if max_model_len < 2:
            raise ValueError(f"--max-model-len {max_model_len}: expected at least 2 tokens")
        context = min(context, max_model_len)
    fault = {"fail_after": int(os.environ.get("RAYPRESS_FAULT_AFTER_BATCHES", "0")),
             "fault_marker": os.environ.get("RAYPRESS_FAULT_MARKER", "")}
    # rows per actor call: the engine starts each as a slot frees up; more rows per call, less idle tail per call
    rows_per_call = batch_size * 8
    blocks = max(1, math.ceil(table.num_rows / rows_per_call))
    ds = ray.data.from_arrow(table).repartition(blocks)
    ds = ds.map_batches(preprocess, batch_format="numpy", batch_size=batch_size, num_cpus=0.25,
                        fn_kwargs={"model": model, "task": task, "column": column, "context": context,
                                   "defaults": defaults})
    ds = ds.map_batches(Predictor, batch_format="numpy", batch_size=rows_per_call,
                        compute=ray.data.ActorPoolStrategy(size=num_actors),
                        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                        fn_constructor_kwargs={"model": model, "task": task, "max_num_seqs": batch_size,
                                               "max_model_len": context, "threads": threads, **fault},
                        max_restarts=-1, max_task_retries=-1)
    ds = ds.map_batches(postprocess, batch_format="numpy", batch_size=batch_size, num_cpus=0.25,
                        fn_kwargs={"model": model, "task": task})
    ds.write_parquet(out[1], filesystem=out[0])


def _default_column(task: str, columns: list[str]) -> str:
    if task == "generate" and "prompt" not in columns and "messages" in columns:
        return "messages"
    return "prompt" if task == "generate" else "text"


def _with_ids(table: pa.Table, id_column: str | None) -> str:
    if id_column is None:
        return ROW_INDEX
    if id_column not in table.column_names:
        raise ValueError(f"--id-column {id_column!r} is not an input column; columns: {table.column_names}")
    missing = table.column(id_column).null_count
    if missing:
        raise ValueError(f"--id-column {id_column!r} is empty on {missing} row(s) (malformed lines have no id "
                         "either); resuming needs an id on every row")
    if pa.compute.count_distinct(table.column(id_column)).as_py() != table.num_rows:
        raise ValueError(f"--id-column {id_column!r} has repeated values; resuming needs one id per row")
    return id_column


def _context_length(model: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models.resolve(model))
    return int(getattr(config, "max_position_embeddings", 512) or 512)


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles functions and classes by module name.
    from jobs import batch_infer as job
    from jobs.cli import run

    sys.exit(run(job.main))
