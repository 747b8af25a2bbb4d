"""Offline batch inference on Ray Data: every input row comes out, with the model's answer or an error.

    python -m jobs.batch_infer --model smollm2-135m --input prompts.jsonl --output out/ --task generate
    python -m jobs.batch_infer --model minilm-l6 --input docs/ --output emb/ --task embed --column text
    ray job submit --working-dir . -- python -m jobs.batch_infer --model artifacts/sweep/chosen --input s3://b/in/ ...

Pipeline: read (parquet, jsonl or csv; a file, folder or glob; any filesystem pyarrow knows) -> template and
tokenize (CPU tasks) -> model actors (--num-actors, --num-gpus-per-actor; each batch sorted by length so padding
wastes little) -> decode and format (CPU tasks) -> parquet files in OUTPUT.

Columns: generate adds generated_text, num_generated_tokens, finish_reason and num_cached_tokens (prompt tokens the
engine's prefix cache already held: rows that share a prefix, such as instructions, prefill it once per actor); per-row
max_tokens, temperature, top_p, seed, stop, json_schema (the answer held to that schema: structured extraction; or
guided_regex, guided_choice, guided_grammar, guided_json_object), presence_penalty, frequency_penalty,
repetition_penalty, min_tokens, top_k, logit_bias, stop_token_ids and ignore_eos columns override the flags
(jobs/params.py). A tools column (OpenAI's tools; with tool_choice and parallel_tool_calls columns) answers with calls
as the chat route does (jobs/tools.py): a tool_calls column (OpenAI's list, as JSON text) and finish_reason
tool_calls; messages may hold an assistant's tool_calls and tool messages. An n column samples a row n times from one
prefill: a choices column holds every sample (text, finish_reason, num_generated_tokens, tool_calls), the row's other
columns the first (num_generated_tokens: all of them). embed adds embedding
(list<float32>, pooled as the model's sentence-transformers config says); score adds logprob_sum, logprob_mean,
perplexity. Every task adds num_prompt_tokens, and error: null or why that row got no answer; and source_file,
source_row: where the row came from (its file relative to INPUT, its row number in that file). Output rows = input rows.
The input streams from storage through Ray Data read tasks; the driver never holds it. --resume skips rows already in
OUTPUT (by --id-column, or by source_file and source_row). OUTPUT and INPUT are local paths or URIs of any filesystem
pyarrow knows.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from compress import models
from engine.sampling import Guided
from jobs import inputs, storage
from jobs.predict import CallLedger, Predictor, input_types, postprocess, preprocess

log = logging.getLogger("jobs.batch_infer")
TASKS = ("generate", "embed", "score")


# ---------------------------------------------------------------------------------------------------------------
# Resume and summary


def done_ids(output: str, id_columns: list[str]) -> set:
    """Keys (``row_keys``) of the rows already written by earlier runs; an unreadable (half-written) file is removed
    so that its rows are redone."""
    fs, root = storage.resolve(output)
    ids = set()
    for f in storage.files(fs, root, ".parquet"):
        try:
            ids.update(row_keys(pq.read_table(f, columns=id_columns, filesystem=fs), id_columns).to_pylist())
        except (pa.ArrowInvalid, OSError) as e:
            log.warning("removing unreadable output %s (%s); its rows will be redone", f, e)
            fs.delete_file(f)
    return ids


def summarize(output: str, task: str, seconds: float) -> tuple[str, float]:
    """The summary line of everything in OUTPUT, and the fraction of its rows that got an error."""
    fs, root = storage.resolve(output)
    dataset = pads.dataset(storage.files(fs, root, ".parquet"), filesystem=fs, format="parquet")
    counts = ["num_prompt_tokens", "num_generated_tokens", "num_cached_tokens"] if task == "generate" else []
    counts = [c for c in counts if c in dataset.schema.names]  # a resumed run's older files may lack one
    table = dataset.to_table(["error", *counts])
    errors = table.column("error").to_pylist()
    n, bad = table.num_rows, sum(e is not None for e in errors)
    total = {c: sum(x or 0 for x in table.column(c).to_pylist()) for c in counts}
    tin, tout = total.get("num_prompt_tokens", 0), total.get("num_generated_tokens", 0)
    line = (f"{n} rows ({n - bad} ok, {bad} errors), {tin} tokens in, {tout} tokens out, {seconds:.1f} s, "
            f"{n / seconds:.2f} rows/s, {(tin + tout) / seconds:.1f} tokens/s")
    if "num_cached_tokens" in total:
        line += f", prefix cache {total['num_cached_tokens'] / max(tin, 1):.0%} of prompt tokens"
    return f"{line} -> {output}", bad / max(n, 1)


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
    json_schema: str | None = None,
    max_error_fraction: float = 0.5,
    engine: str = "auto",
    tensor_parallel_size: int | None = None,
) -> int:
    """Run a model over a dataset with Ray Data and write every row, answered or with its error, to parquet.

    Args:
        model: built-in name, model folder, raypress artifact (e.g. a sweep's chosen/), or hub id.
        input: parquet, jsonl or csv: a file, a folder, or a glob; local or any pyarrow filesystem (s3://...).
        output: folder for the output parquet files: a local path or a URI (s3://, gs://, file://).
        task: generate (text), embed (sentence embeddings) or score (log-probability and perplexity of the text).
        column: input column: default prompt (or messages, in OpenAI chat form) for generate, text otherwise.
        id_column: column that identifies rows, for --resume; default: source_file and source_row. Checked in one
            pass before the run: on every row, never repeated.
        resume: skip rows already written to OUTPUT by an interrupted run.
        num_actors: model actors (replicas) in the pool.
        num_gpus_per_actor: GPUs per actor: fractional to share one; several shard one model over them with
            --engine vllm (tensor parallel; raypress's engine takes one GPU, or several for --task embed).
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
        json_schema: hold every answer to this JSON schema (its text, or a .json file holding it); a json_schema
            column overrides it per row. Answers always parse, unless they end by max_tokens (finish_reason
            length); a schema that does not compile is its rows' error.
        max_error_fraction: exit with status 1 (after writing every row) when more of OUTPUT's rows than this
            fraction got an error.
        engine: raypress (its own engine, built for CPUs), vllm (vLLM, the engine of GPU clusters; an artifact goes
            to it as its compressed-tensors export, written beside it once) or auto: vllm when the actors get GPUs
            and vLLM is installed, raypress otherwise. Same rows, columns and errors either way; embed runs on
            raypress's.
        tensor_parallel_size: vllm: GPUs one model is sharded over (default: --num-gpus-per-actor).
    """
    import ray

    start = time.perf_counter()
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {TASKS}")
    out_fs, out_dir = storage.resolve(output)
    listing = inputs.list_input_files(input)
    first = inputs.peek(listing)  # the first rows: listed and read once, here and for the read tasks
    columns = inputs.columns_of(first)
    column = column or _default_column(task, columns)
    if column not in columns:
        raise ValueError(f"input has no column {column!r}; its columns: {columns} (use --column)")
    local = storage.local_model(model)  # a URI: copied here once (and by each node's tasks and actors)
    kind = models.kind_of(local)
    if (task == "embed") != (kind == models.ENCODER):
        raise ValueError(f"--task {task} does not fit {model!r}, a {kind} model: encoders embed; causal LMs "
                         "generate and score")
    vllm = _vllm_settings(engine, task, local, num_gpus_per_actor, tensor_parallel_size)
    if id_column is not None and id_column not in columns:
        raise ValueError(f"--id-column {id_column!r} is not an input column; columns: {columns}")
    id_columns = [id_column] if id_column else [inputs.SOURCE_FILE, inputs.SOURCE_ROW]
    existing = storage.files(out_fs, out_dir, ".parquet")
    if existing and not resume:
        raise ValueError(f"output {output!r} already holds {len(existing)} parquet file(s); pass --resume to "
                         "continue that run, or choose another folder")
    if not ray.is_initialized():
        ray.init(configure_logging=False)
    # read tasks stream the files; the driver holds none of it
    source = inputs.InputFiles(listing, first, input_types(task, column))
    ds = ray.data.read_datasource(source)
    if id_column:
        _check_ids(ds, id_column)
    done = done_ids(output, id_columns) if resume else set()
    if done:
        log.info("resume: %d rows already written to %s; skipping them", len(done), output)
        ds = ds.map_batches(_not_done, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
                            fn_kwargs={"done": pa.array(sorted(done)), "id_columns": id_columns})
    defaults = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "stop": tuple(stop or ()), "chat": chat, "json_schema": _schema_text(json_schema)}
    resources = json.loads(actor_resources) if actor_resources else {}
    ds = _pipeline(ray, ds, source.schema, model=model, local=local, task=task, column=column, defaults=defaults,
                   num_actors=num_actors, num_gpus=num_gpus_per_actor, num_cpus=cpus_per_actor,
                   threads=threads_per_actor, resources=resources, batch_size=batch_size, max_model_len=max_model_len,
                   vllm=vllm)
    ds.write_parquet(out_dir, filesystem=out_fs)
    line, error_fraction = summarize(output, task, time.perf_counter() - start)
    print(line)
    if error_fraction > max_error_fraction:  # every row is written; the exit code says the run went badly
        print(f"error: {error_fraction:.0%} of the rows got an error, above --max-error-fraction "
              f"{max_error_fraction:.0%}; see the error column", file=sys.stderr)
        return 1
    return 0


def _pipeline(ray, ds, schema, *, model, local, task, column, defaults, num_actors, num_gpus, num_cpus, threads,
              resources, batch_size, max_model_len, vllm=None):
    """read -> preprocess (CPU tasks) -> Predictor (model actors) -> postprocess (CPU tasks). ``model`` goes to the
    tasks and actors (a URI: each node copies it); ``local`` is the driver's copy."""
    context = models.input_limit(models.resolve(local))
    if task == "generate":
        if max_model_len < 2:
            raise ValueError(f"--max-model-len {max_model_len}: expected at least 2 tokens")
        context = min(context, max_model_len)
    # rows per actor call: the engine starts each as a slot frees up; more rows per call, less idle tail per call
    rows_per_call = batch_size * 8
    # Ray restarts a dead model actor and retries its call there; the ledger bounds how often one call may kill it
    ledger = ray.remote(CallLedger).options(num_cpus=0).remote()
    ds = ds.map_batches(preprocess, batch_format="pyarrow", batch_size=batch_size, num_cpus=0.25,
                        fn_kwargs={"model": model, "task": task, "column": column, "context": context,
                                   "defaults": defaults})
    ds = ds.map_batches(Predictor, batch_format="numpy", batch_size=rows_per_call,
                        compute=ray.data.ActorPoolStrategy(size=num_actors),
                        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                        fn_constructor_kwargs={"model": model, "task": task, "column": column,
                                               "max_num_seqs": batch_size, "max_model_len": context,
                                               "threads": threads, "ledger": ledger, "vllm": vllm},
                        max_restarts=-1, max_task_retries=-1)
    ds = ds.map_batches(postprocess, batch_format="numpy", batch_size=batch_size, num_cpus=0.25,
                        fn_kwargs={"task": task, "schema": schema})
    return ds


def _vllm_settings(engine: str, task: str, model: str, num_gpus: float, tensor_parallel_size: int | None):
    """The model actors' vLLM settings (Predictor's ``vllm``), or None to run on raypress's engine."""
    from engine import vllm as vllm_engine

    chosen = vllm_engine.choose(engine, num_gpus, causal=task != "embed")
    if engine == "auto":
        log.info("--engine auto: %s", chosen)
    if chosen == "raypress":
        if tensor_parallel_size:
            raise ValueError("--tensor-parallel-size shards a model over GPUs with vLLM: add --engine vllm")
        if num_gpus > 1 and task != "embed":  # layers over several devices, its KV cache on one: cannot work
            raise ValueError(f"--num-gpus-per-actor {num_gpus:g} shards one model over GPUs, which raypress's engine "
                             f"does not: add --engine vllm (tensor parallel over them), or give each actor one GPU")
        return None
    from jobs.export import for_vllm

    folder = for_vllm(model)  # made here first: the actors of this node find it made
    settings = vllm_engine.run_settings(folder, on_gpu=num_gpus > 0)  # no GPUs: vLLM's CPU backend runs it
    return {"tensor_parallel_size": tensor_parallel_size or max(1, int(num_gpus)), **settings}


def _schema_text(value: str | None) -> str | None:
    """--json-schema: the schema's text, or a file holding it; checked here, before any row runs."""
    if value is None:
        return None
    if not value.lstrip().startswith(("{", "true", "false")):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"--json-schema {value!r}: neither a JSON schema nor a file holding one")
        value = path.read_text()
    try:
        Guided("json_schema", value)
    except ValueError as e:
        raise ValueError(f"--json-schema: {e}") from e
    return value


def _default_column(task: str, columns: list[str]) -> str:
    if task == "generate" and "prompt" not in columns and "messages" in columns:
        return "messages"
    return "prompt" if task == "generate" else "text"


def _check_ids(ds, id_column: str) -> None:
    """Every row has an id, and no id repeats: one pass over the id column (the driver holds the ids, not the rows)."""
    seen, missing = set(), 0
    for batch in ds.select_columns([id_column]).iter_batches(batch_format="pyarrow", batch_size=None):
        ids = batch.column(id_column)
        missing += ids.null_count
        for value in ids.drop_null().to_pylist():
            if value in seen:
                raise ValueError(f"--id-column {id_column!r} has repeated values ({value!r}); resuming needs one id "
                                 "per row")
            seen.add(value)
    if missing:
        raise ValueError(f"--id-column {id_column!r} is empty on {missing} row(s) (malformed lines have no id "
                         "either); resuming needs an id on every row")


def row_keys(table: pa.Table, id_columns: list[str]) -> pa.Array:
    """One key per row: the id column's value, or "source_file\\x1fsource_row" for the default ids."""
    if len(id_columns) == 1:
        return table.column(id_columns[0]).combine_chunks()
    file, row = (table.column(c) for c in id_columns)
    return pa.compute.binary_join_element_wise(file, pa.compute.cast(row, pa.string()), "\x1f").combine_chunks()


def _not_done(table: pa.Table, done: pa.Array, id_columns: list[str]) -> pa.Table:
    return table.filter(pa.compute.invert(pa.compute.is_in(row_keys(table, id_columns), value_set=done)))





if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles functions and classes by module name.
    from jobs import batch_infer as job
    from jobs.cli import run

    sys.exit(run(job.main))
