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

import json
import logging
import math
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from compress import models
from jobs import storage
from jobs.inputs import read_input
from jobs.predict import Predictor, postprocess, preprocess

log = logging.getLogger("jobs.batch_infer")
TASKS = ("generate", "embed", "score")
ROW_INDEX = "row_index"


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


def summarize(output: str, task: str, seconds: float) -> tuple[str, float]:
    """The summary line of everything in OUTPUT, and the fraction of its rows that got an error."""
    fs, root = storage.resolve(output)
    columns = ["error"] + (["num_prompt_tokens", "num_generated_tokens"] if task == "generate" else [])
    table = pads.dataset(storage.files(fs, root, ".parquet"), filesystem=fs, format="parquet").to_table(columns)
    errors = table.column("error").to_pylist()
    n, bad = table.num_rows, sum(e is not None for e in errors)
    tin = sum(x or 0 for x in table.column("num_prompt_tokens").to_pylist()) if task == "generate" else 0
    tout = sum(x or 0 for x in table.column("num_generated_tokens").to_pylist()) if task == "generate" else 0
    line = (f"{n} rows ({n - bad} ok, {bad} errors), {tin} tokens in, {tout} tokens out, {seconds:.1f} s, "
            f"{n / seconds:.2f} rows/s, {(tin + tout) / seconds:.1f} tokens/s -> {output}")
    return line, bad / max(n, 1)


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
    max_error_fraction: float = 0.5,
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
        max_error_fraction: exit with status 1 (after writing every row) when more of OUTPUT's rows than this
            fraction got an error.
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
    line, error_fraction = summarize(output, task, time.perf_counter() - start)
    print(line)
    if error_fraction > max_error_fraction:  # every row is written; the exit code says the run went badly
        print(f"error: {error_fraction:.0%} of the rows got an error, above --max-error-fraction "
              f"{max_error_fraction:.0%}; see the error column", file=sys.stderr)
        return 1
    return 0


def _run_pipeline(ray, table, model, task, column, defaults, out, num_actors, num_gpus, num_cpus, threads,
                  resources, batch_size, max_model_len) -> None:
    context = models.input_limit(models.resolve(model))
    if task == "generate":
        if max_model_len < 2:
            raise ValueError(f"--max-model-len {max_model_len}: expected at least 2 tokens")
        context = min(context, max_model_len)
    # rows per actor call: the engine starts each as a slot frees up; more rows per call, less idle tail per call
    rows_per_call = batch_size * 8
    blocks = max(1, math.ceil(table.num_rows / rows_per_call))
    ds = ray.data.from_arrow(table).repartition(blocks)
    ds = ds.map_batches(preprocess, batch_format="pyarrow", batch_size=batch_size, num_cpus=0.25,
                        fn_kwargs={"model": model, "task": task, "column": column, "context": context,
                                   "defaults": defaults})
    ds = ds.map_batches(Predictor, batch_format="numpy", batch_size=rows_per_call,
                        compute=ray.data.ActorPoolStrategy(size=num_actors),
                        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                        fn_constructor_kwargs={"model": model, "task": task, "column": column,
                                               "max_num_seqs": batch_size, "max_model_len": context,
                                               "threads": threads},
                        max_restarts=-1, max_task_retries=-1)
    ds = ds.map_batches(postprocess, batch_format="numpy", batch_size=batch_size, num_cpus=0.25,
                        fn_kwargs={"task": task})
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




if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles functions and classes by module name.
    from jobs import batch_infer as job
    from jobs.cli import run

    sys.exit(run(job.main))
