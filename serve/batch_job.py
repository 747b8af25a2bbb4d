"""The job behind one OpenAI batch: a Ray job that runs jobs.batch_infer over the batch's requests and writes
OpenAI's batch output and error files.

    python -m serve.batch_job --storage DIR_OR_URI --batch-id batch_... --input-file-id file-... --endpoint ...

The serving app submits it (serve/batches.py); it runs on the cluster, not in the serving replica. Steps:

1. prepare: each request line is checked as the synchronous endpoint checks its body (same models, same errors);
   a refused line goes to ``rejected.jsonl`` with the error that endpoint would answer, the others become rows
   (one per prompt or input text) in ``rows.parquet``.
2. jobs.batch_infer over the rows, writing ``results/`` as rows finish (resumable by row id).
3. finalize: one line per request, in input order, to the output file (status 200, the body the synchronous
   endpoint answers) or the error file, then ``summary.json``. The serving app also finalizes a batch that was
   cancelled, expired or failed, from the rows that finished.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydantic import ValidationError

from jobs import storage
from jobs.params import PARAM_TYPES
from jobs.predict import MESSAGES
from serve import protocol as oa
from serve import responses as rs
from serve.protocol import APIError

ENDPOINTS = {"/v1/chat/completions": "generate", "/v1/completions": "generate", "/v1/embeddings": "embed"}
COLUMN = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "text"}


# ---------------------------------------------------------------------------------------------------------------
# The input file: checked when the batch is created (by the serving app), with the line of the first problem


def parse_requests(data: bytes, endpoint: str, max_requests: int) -> list[tuple[str, dict]]:
    """The (custom_id, body) of each request line; a file OpenAI would refuse raises APIError naming the line."""

    def refuse(n: int, why: str):
        raise APIError(400, f"input file line {n}: {why}", "input_file_id")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"input file is not UTF-8 text: {e}", "input_file_id") from e
    requests, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            refuse(n, f"not JSON ({e})")
        if not isinstance(item, dict):
            refuse(n, f"a JSON {type(item).__name__}, not an object")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            refuse(n, "custom_id must be a non-empty string")
        if custom_id in seen:
            refuse(n, f"custom_id {custom_id!r} repeats line {seen[custom_id]}; each request needs its own")
        if item.get("method") != "POST":
            refuse(n, f"method must be 'POST', not {item.get('method')!r}")
        if item.get("url") != endpoint:
            refuse(n, f"url {item.get('url')!r} differs from the batch's endpoint {endpoint!r}; a batch has one")
        if not isinstance(item.get("body"), dict):
            refuse(n, "body must be a JSON object")
        seen[custom_id] = n
        requests.append((custom_id, item["body"]))
        if len(requests) > max_requests:
            refuse(n, f"a batch takes at most {max_requests} requests")
    if not requests:
        raise APIError(400, "input file holds no requests", "input_file_id")
    return requests


# ---------------------------------------------------------------------------------------------------------------
# 1. prepare


BATCH_LATER = {"echo", "top_logprobs"}
ROW_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "top_k", "ignore_eos",
              "stop_token_ids", "n", "parallel_tool_calls")  # carried as row columns (jobs.params)
GUIDED_COLUMN = {"json_schema": "json_schema", "json_object": "guided_json_object", "regex": "guided_regex",
                 "choice": "guided_choice", "grammar": "guided_grammar"}  # Guided's kind -> its row column


def to_rows(line: int, body: dict, endpoint: str, served: str, causal: bool, default_max_tokens: int) -> list[dict]:
    """The rows of one request, checked as the synchronous endpoint checks it (APIError when it would refuse)."""
    chat, embed = endpoint == "/v1/chat/completions", endpoint == "/v1/embeddings"
    model = oa.EmbeddingRequest if embed else oa.ChatRequest if chat else oa.CompletionRequest
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        raise oa.validation_error(e.errors()) from e
    oa.check_model(request.model, served, causal, causal=not embed)
    if embed:
        return [{"text": t, "encoding_format": request.encoding_format} for t in oa.texts_of(request)]
    if request.stream:
        raise APIError(400, "stream: true is not available in a batch", "stream")
    if request.logprobs:
        raise APIError(400, "logprobs are not available in a batch yet", "logprobs")
    later = sorted(request.model_fields_set & BATCH_LATER)
    if later:  # refused by name rather than dropped: the batch rows do not carry them yet
        raise APIError(400, f"{later[0]} is not available in a batch yet (the synchronous endpoint takes it)", later[0])
    settings = oa.generation_settings(request, default_max_tokens)
    settings["stop"] = list(settings["stop"])
    settings.update({k: getattr(request, k) for k in ROW_FIELDS if k in request.model_fields_set})
    if request.logit_bias:  # its token ids are checked with the row's other settings (a row error)
        settings["logit_bias"] = json.dumps(request.logit_bias)
    if chat and request.tools:  # planned with the row (jobs.tools), as the chat route plans them
        settings["tools"] = json.dumps([t.model_dump(exclude_none=True, by_alias=True) for t in request.tools])
    if chat and request.tool_choice is not None:
        choice = request.tool_choice
        settings["tool_choice"] = choice if isinstance(choice, str) else choice.function.name
    guided = oa.guided_of(request)
    if guided is not None:
        settings[GUIDED_COLUMN[guided.kind]] = (True if guided.kind == "json_object" else
                                                json.loads(guided.spec) if guided.kind == "choice" else guided.spec)
    if chat:
        return [{"messages": [_message(m) for m in request.messages], **settings}]
    prompts = oa.prompts_of(request)
    if not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt as token ids is not available in a batch yet: send text", "prompt")
    return [{"prompt": p, **settings} for p in prompts]


def _message(m: oa.ChatMessage) -> dict:
    """A chat message as a row holds it (jobs.predict.MESSAGES): an assistant's tool calls as JSON text."""
    calls = json.dumps([c.model_dump() for c in m.tool_calls]) if m.tool_calls else None
    return {"role": m.role, "content": m.content, "tool_calls": calls, "tool_call_id": m.tool_call_id}


def prepare(fs, folder: str, requests: list[tuple[str, dict]], endpoint: str, served: str, causal: bool,
            default_max_tokens: int) -> int:
    """Write rows.parquet and rejected.jsonl; returns the number of rows for the model."""
    rows, rejected = [], []
    for line, (_, body) in enumerate(requests):
        try:
            for k, row in enumerate(to_rows(line, body, endpoint, served, causal, default_max_tokens)):
                rows.append({"row_id": f"{line}:{k}", "line": line, "k": k, **row})
        except APIError as e:
            rejected.append({"line": line, "status": e.status, "error": oa.error_body(e.message, e.kind, e.param)})
    column = COLUMN[endpoint]
    fields = [("row_id", pa.string()), ("line", pa.int64()), ("k", pa.int64())]
    if column == "text":
        fields += [("text", pa.string()), ("encoding_format", pa.string())]
    else:
        fields += [(column, MESSAGES if column == "messages" else pa.string()), *PARAM_TYPES.items()]
    schema = pa.schema(fields)
    storage.write_parquet(fs, f"{folder}/rows.parquet", pa.Table.from_pylist(rows, schema=schema))
    storage.write_bytes(fs, f"{folder}/rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected).encode())
    return len(rows)


# ---------------------------------------------------------------------------------------------------------------
# 3. finalize


def _results(fs, folder: str, columns: list[str]) -> list[dict]:
    """Finished rows; a file cut short by a cancelled job is skipped (its rows count as not run). Columns a file
    lacks (written by an older version) are left out of its rows."""
    found = []
    for f in storage.files(fs, f"{folder}/results", ".parquet"):
        try:
            names = pq.read_schema(f, filesystem=fs).names
            found += pq.read_table(f, columns=[c for c in columns if c in names], filesystem=fs).to_pylist()
        except (pa.ArrowInvalid, OSError):
            continue
    return found


def _rows_per_line(fs, folder: str) -> dict[int, int]:
    if not storage.exists(fs, f"{folder}/rows.parquet"):  # the job failed before it wrote any
        return {}
    lines = pads.dataset(f"{folder}/rows.parquet", filesystem=fs).to_table(columns=["line"]).column("line")
    counts = defaultdict(int)
    for line in lines.to_pylist():
        counts[line] += 1
    return counts


def _rejected(fs, folder: str) -> dict[int, dict]:
    if not storage.exists(fs, f"{folder}/rejected.jsonl"):
        return {}
    text = storage.read_bytes(fs, f"{folder}/rejected.jsonl").decode()
    return {r["line"]: r for r in map(json.loads, text.splitlines())}


def progress(fs, folder: str, total: int) -> dict:
    """request_counts so far: a request is completed when all its rows finished without error."""
    expected, rejected = _rows_per_line(fs, folder), _rejected(fs, folder)
    done, failed = defaultdict(int), set(rejected)
    for r in _results(fs, folder, ["line", "error"]):
        done[r["line"]] += 1
        if r["error"]:
            failed.add(r["line"])
    completed = sum(1 for line, n in done.items() if n == expected.get(line) and line not in failed)
    return {"total": total, "completed": completed, "failed": len(failed)}


def _body(endpoint: str, served: str, rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["k"])
    prompt_tokens = sum(r["num_prompt_tokens"] for r in rows)
    if endpoint == "/v1/embeddings":
        return rs.embeddings(served, [r["embedding"] for r in rows], prompt_tokens, rows[0]["encoding_format"])
    generated = sum(r["num_generated_tokens"] for r in rows)
    choices = [c for r in rows for c in r.get("choices") or [  # n samples per prompt, prompt by prompt
        {"text": r["generated_text"], "finish_reason": r["finish_reason"], "tool_calls": r.get("tool_calls")}]]
    texts, reasons = [c["text"] for c in choices], [c["finish_reason"] for c in choices]
    if endpoint == "/v1/chat/completions":
        calls = [json.loads(c["tool_calls"]) if c.get("tool_calls") else None for c in choices]
        return rs.chat_completion(served, texts, reasons, prompt_tokens, generated,
                                  cached_tokens=rows[0].get("num_cached_tokens") or 0, tool_calls=calls)
    return rs.completion(served, texts, reasons, prompt_tokens, generated,
                         cached_tokens=sum(r.get("num_cached_tokens") or 0 for r in rows))


def finalize(fs, root: str, batch_id: str, custom_ids: list[str], endpoint: str, served: str,
             unfinished: str | None = None) -> dict:
    """Write the output and error files (one line per request, input order) and summary.json; returns the summary.
    ``unfinished`` says why rows that never ran did not ("cancelled", "expired", "failed"); None after a full run."""
    folder = f"{root}/batches/{batch_id}"
    expected, rejected = _rows_per_line(fs, folder), _rejected(fs, folder)
    extra = ["embedding", "encoding_format"] if endpoint == "/v1/embeddings" else \
        ["generated_text", "finish_reason", "num_generated_tokens", "num_cached_tokens", "tool_calls", "choices"]
    by_line = defaultdict(list)
    for r in _results(fs, folder, ["line", "k", "error", "num_prompt_tokens", *extra]):
        by_line[r["line"]].append(r)
    outputs, errors = [], []
    for line, custom_id in enumerate(custom_ids):
        entry = {"id": rs.new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": None}
        rows = by_line.get(line, [])
        failed = next((r["error"] for r in rows if r["error"]), None)
        if line in rejected:
            status, body = rejected[line]["status"], rejected[line]["error"]
        elif failed:
            kind = "server_error" if failed.startswith("model error") else "invalid_request_error"
            status, body = (500 if kind == "server_error" else 400), oa.error_body(failed, kind)
        elif rows and len(rows) == expected.get(line):
            status, body = 200, _body(endpoint, served, rows)
        else:
            why = unfinished or "failed"
            entry["error"] = {"code": f"batch_{why}", "message": f"the batch was {why} before this request ran"}
            errors.append(entry)
            continue
        entry["response"] = {"status_code": status, "request_id": rs.new_id("req_"), "body": body}
        (outputs if status == 200 else errors).append(entry)
    summary = {"request_counts": {"total": len(custom_ids), "completed": len(outputs),
                                  "failed": sum(1 for e in errors if e["response"] is not None)}}
    for key, entries, name in (("output_file", outputs, "output"), ("error_file", errors, "error")):
        summary[key] = None
        if entries:
            file_id = f"file-{batch_id}-{name}"  # the batch's own: finalizing again rewrites these, leaves no other
            data = "".join(json.dumps(e) + "\n" for e in entries).encode()
            storage.write_bytes(fs, f"{root}/files/{file_id}", data)
            summary[key] = {"id": file_id, "filename": f"{batch_id}_{name}.jsonl", "bytes": len(data)}
    storage.write_bytes(fs, f"{folder}/summary.json", json.dumps(summary).encode())
    return summary


# ---------------------------------------------------------------------------------------------------------------
# The job


def main(
    *,
    storage_uri: str,
    batch_id: str,
    input_file_id: str,
    endpoint: str,
    model: str,
    served_name: str,
    causal: bool = True,
    default_max_tokens: int = 64,
    max_model_len: int = 2048,
    max_requests: int = 50_000,
    num_actors: int = 1,
    cpus_per_actor: float = 1.0,
    num_gpus_per_actor: float = 0.0,
    engine: str = "auto",
    batch_size: int = 16,
) -> int:
    """Run one OpenAI batch: check its requests, generate or embed with jobs.batch_infer, write its output files.

    Args:
        storage_uri: the Batch API's storage root (local folder or URI) that holds the input file.
        batch_id: the batch; its folder is batches/<batch_id> under the root.
        input_file_id: the uploaded request file, files/<input_file_id>.
        endpoint: /v1/chat/completions, /v1/completions or /v1/embeddings.
        model: what the serving app loaded: built-in name, folder or artifact.
        served_name: the model id the serving app answers with.
        causal: whether the model is a causal LM (else an encoder).
        default_max_tokens: the serving app's default for a request without max_tokens.
        max_model_len: prompt + new tokens of one request, as the serving app allows.
        max_requests: requests a batch may hold.
        num_actors: model actors for the job.
        cpus_per_actor: CPUs per model actor.
        num_gpus_per_actor: GPUs per model actor (jobs.batch_infer's --num-gpus-per-actor).
        engine: auto, raypress or vllm (jobs.batch_infer's --engine: auto takes vLLM where the actors get GPUs).
        batch_size: sequences each actor decodes together.
    """
    from jobs import batch_infer

    fs, root = storage.resolve(storage_uri)
    folder = f"{root}/batches/{batch_id}"
    fs.create_dir(folder, recursive=True)
    requests = parse_requests(storage.read_bytes(fs, f"{root}/files/{input_file_id}"), endpoint, max_requests)
    n = prepare(fs, folder, requests, endpoint, served_name, causal, default_max_tokens)
    print(f"batch {batch_id}: {len(requests)} requests, {n} rows for the model", flush=True)
    if n:
        base = storage_uri.rstrip("/") if "://" in storage_uri else root
        batch_infer.main(model=model, input=f"{base}/batches/{batch_id}/rows.parquet",
                         output=f"{base}/batches/{batch_id}/results", task=ENDPOINTS[endpoint],
                         column=COLUMN[endpoint], id_column="row_id", resume=True, num_actors=num_actors,
                         cpus_per_actor=cpus_per_actor, num_gpus_per_actor=num_gpus_per_actor, engine=engine,
                         batch_size=batch_size, max_model_len=max_model_len,
                         max_tokens=default_max_tokens, max_error_fraction=1.0)  # errors go to the error file
    storage.write_bytes(fs, f"{folder}/finalizing", b"")
    summary = finalize(fs, root, batch_id, [c for c, _ in requests], endpoint, served_name)
    print(f"batch {batch_id}: {json.dumps(summary['request_counts'])}", flush=True)
    return 0


if __name__ == "__main__":
    from jobs.cli import run
    from serve import batch_job as job

    sys.exit(run(job.main))
