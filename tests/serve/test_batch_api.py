"""The OpenAI Batch API with the official client, against `serve run` on a local Ray cluster started with
`ray start` (token authentication on): files and batches, each batch a Ray job, state in SQLite and a storage
folder that outlive the server."""

import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PORT, GCS, DASHBOARD = 8013, 6393, 8293
URL = f"http://127.0.0.1:{PORT}"
KEY = "batch-test-key"

pytestmark = [pytest.mark.timeout(600), pytest.mark.e2e]


class Server:
    """`ray start` once for the module; `serve run CONFIG` against it, which a test may restart."""

    def __init__(self, tmp: Path, tiny_causal_dir: Path, ray_heads):
        self.tmp, self.temp_dir = tmp, f"/tmp/rpb-{uuid.uuid4().hex[:6]}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token", "RAYPRESS_API_KEY": KEY}
        common = {"batch_cpus_per_actor": 0.5, "num_threads": 1, "max_num_seqs": 8, "default_max_tokens": 8,
                  "batch_poll_s": 2}
        deployment = [{"name": "ModelServer", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}]
        config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": PORT}, "applications": [
            {"name": "chat", "route_prefix": "/", "import_path": "serve.app:build", "deployments": deployment,
             "args": {"model": str(tiny_causal_dir), "batch_storage": str(tmp / "storage"), **common}},
            {"name": "embed", "route_prefix": "/minilm", "import_path": "serve.app:build", "deployments": deployment,
             "args": {"model": "minilm-l6", "batch_storage": str(tmp / "storage-minilm"), **common}}]}
        self.config = tmp / "serve.yaml"
        self.config.write_text(yaml.safe_dump(config))
        start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={GCS}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD}", "--num-cpus=4", "--temp-dir",
                 self.temp_dir, "--include-dashboard=true", "--disable-usage-stats",
                 "--dashboard-agent-listen-port=52401", "--dashboard-agent-grpc-port=52402",
                 "--metrics-export-port=52403", "--runtime-env-agent-port=52404", "--ray-client-server-port=52405"]
        self.heads = ray_heads
        self.session = ray_heads.start(start, self.env)
        self.proc = None
        self.start()

    def start(self) -> None:
        log = open(self.tmp / "serve.log", "a")
        self.proc = subprocess.Popen([str(BIN / "serve"), "run", str(self.config), "--address", f"127.0.0.1:{GCS}"],
                                     cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if all(requests.get(f"{URL}{p}/health", timeout=5).status_code == 200 for p in ("", "/minilm")):
                    return
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, self.log()
            time.sleep(1)
        pytest.fail("serve run did not come up: " + self.log())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # serve run deletes its applications on Ctrl-C
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def log(self) -> str:
        return (self.tmp / "serve.log").read_text()[-4000:]

    def close(self) -> None:
        self.stop()
        self.heads.stop(self.session)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_causal_dir, ray_heads):
    s = Server(tmp_path_factory.mktemp("batch-api"), tiny_causal_dir, ray_heads)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{URL}/v1", api_key=KEY, max_retries=0, timeout=120)


def upload(client, lines: list) -> str:
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    return client.files.create(file=("requests.jsonl", data), purpose="batch").id


def chat_line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}], "temperature": 0, **body}}


def wait(client, batch_id: str, until=("completed", "failed", "cancelled", "expired"), timeout=300, seen=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        batch = client.batches.retrieve(batch_id)
        if seen is not None:
            seen.append(batch.status)
        if batch.status in until:
            return batch
        time.sleep(0.5)
    pytest.fail(f"batch {batch_id} still {batch.status} after {timeout} s")


def lines_of(client, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def test_every_route_needs_the_api_key(server):
    routes = [("post", "/v1/files"), ("get", "/v1/files/file-x"), ("get", "/v1/files/file-x/content"),
              ("delete", "/v1/files/file-x"), ("post", "/v1/batches"), ("get", "/v1/batches/batch_x"),
              ("get", "/v1/batches"), ("post", "/v1/batches/batch_x/cancel")]
    for method, path in routes:
        r = requests.request(method, URL + path, timeout=30)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        wrong = requests.request(method, URL + path, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401, (method, path)


def test_malformed_files_are_refused_at_create_time_with_the_line(client):
    good = chat_line("a", "Hello")
    cases = {
        "line 2: not JSON": [good, "{oops"],
        "line 2: custom_id must be a non-empty string": [good, {**chat_line("b", "x"), "custom_id": ""}],
        "line 3: custom_id 'a' repeats line 1": [good, chat_line("b", "x"), chat_line("a", "y")],
        "line 1: method must be 'POST'": [{**good, "method": "GET"}],
        "line 2: url '/v1/embeddings' differs from the batch's endpoint": [good, {**chat_line("b", "x"),
                                                                                 "url": "/v1/embeddings"}],
        "line 1: body must be a JSON object": [{**good, "body": [1]}],
        "holds no requests": ["", "  "],
    }
    for expected, lines in cases.items():
        file_id = upload(client, lines)
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert expected in e.value.message, (expected, e.value.message)
    file_id = upload(client, [good])
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="does not fit the served model"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")


UNIT = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}}}


def answers(body: dict) -> list:
    """Each choice's role, text, tool calls (name and arguments: ids differ) and finish reason."""
    return [(c["message"]["role"], c["message"]["content"], [(t["function"]["name"], t["function"]["arguments"])
                                                              for t in c["message"].get("tool_calls") or ()],
             c["finish_reason"]) for c in body["choices"]]


def test_a_chat_batch_answers_every_line_as_the_synchronous_endpoint_does(client):
    settings = [{}, {"logit_bias": {"28": -100, "30": 5}, "presence_penalty": 0.5},
                {"response_format": {"type": "json_object"}}, {"top_k": 3, "ignore_eos": True},
                {"guided_choice": ["yes", "no"]}, {"guided_regex": "[0-9]{2,4}", "stop_token_ids": [31]},
                {"tools": [UNIT], "tool_choice": "required", "max_tokens": 40}, {"n": 2}]
    lines = [chat_line(f"req-{i}", f"Tell me about the number {i}.", **{"max_tokens": 4 + i % 7, **settings[i % 8]})
             for i in range(46)]
    lines += [chat_line("bad-empty", "x") | {"body": {"messages": []}},
              chat_line("bad-model", "Hi", model="someone-else"),
              chat_line("bad-stop", "Hi", stop=[""]),
              chat_line("too-long", "Hi", max_tokens=100_000)]
    file_id = upload(client, lines)
    created = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                    metadata={"purpose": "test"})
    assert created.status == "validating" and created.request_counts.total == 50
    seen = []
    batch = wait(client, created.id, seen=seen)
    assert batch.status == "completed", (batch.status, batch.errors)
    assert batch.request_counts.total == 50 and batch.request_counts.completed == 46
    assert batch.request_counts.failed == 4 and batch.metadata == {"purpose": "test"}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and "in_progress" in seen
    outputs, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in outputs + errors) == sorted(x["custom_id"] for x in lines)
    assert [x["custom_id"] for x in outputs] == [f"req-{i}" for i in range(46)]
    served = client.models.list().data[0].id  # input order
    for line, out in zip(lines, outputs, strict=False):
        assert out["response"]["status_code"] == 200 and out["error"] is None
        request = {"model": served, **line["body"]}  # vLLM's fields go as the openai client's extra_body
        vllm = ("top_k", "ignore_eos", "guided_choice", "guided_regex", "stop_token_ids")
        sync = client.chat.completions.create(**{k: v for k, v in request.items() if k not in vllm},
                                              extra_body={k: v for k, v in request.items() if k in vllm}).model_dump()
        body = out["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == sync["model"]
        assert answers(body) == answers(sync) and len(body["choices"]) == line["body"].get("n", 1)
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert {k: body["usage"][k] for k in counts} == {k: sync["usage"][k] for k in counts}
        # what the prefix cache held differs between the batch's engine and the server's; both say it
        assert 0 <= body["usage"]["prompt_tokens_details"]["cached_tokens"] <= body["usage"]["prompt_tokens"]
        assert sync["usage"]["prompt_tokens_details"]["cached_tokens"] <= sync["usage"]["prompt_tokens"]
    by_id = {e["custom_id"]: e for e in errors}
    for line in lines[46:49]:  # refused as the synchronous endpoint refuses them: same status, same message
        with pytest.raises(openai.BadRequestError) as sync_error:
            client.chat.completions.create(**{"model": served, **line["body"]})
        response = by_id[line["custom_id"]]["response"]
        assert response["status_code"] == 400
        assert response["body"]["error"]["message"] == sync_error.value.body["message"]
    assert by_id["too-long"]["response"]["status_code"] == 400
    assert "exceed the limit" in by_id["too-long"]["response"]["body"]["error"]["message"]


def test_an_embeddings_batch_on_minilm_equals_the_synchronous_vectors(server):
    client = openai.OpenAI(base_url=f"{URL}/minilm/v1", api_key=KEY, max_retries=0, timeout=120)
    inputs = ["A cat sat on the mat.", ["Paris is in France.", "Ray runs batch jobs."], "Embeddings are vectors."]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"input": x, "encoding_format": "float"}} for i, x in enumerate(inputs)]
    lines.append({"custom_id": "e-empty", "method": "POST", "url": "/v1/embeddings", "body": {"input": ""}})
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/embeddings",
                                  completion_window="24h")
    batch = wait(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3 and batch.request_counts.failed == 1
    outputs = lines_of(client, batch.output_file_id)
    assert [o["custom_id"] for o in outputs] == ["e0", "e1", "e2"]
    for x, out in zip(inputs, outputs, strict=True):
        sync = client.embeddings.create(input=x, model="minilm-l6", encoding_format="float")
        body = out["response"]["body"]
        assert len(body["data"]) == len(sync.data) and body["usage"]["prompt_tokens"] == sync.usage.prompt_tokens
        for mine, theirs in zip(body["data"], sync.data, strict=True):
            a, b = np.array(mine["embedding"]), np.array(theirs.embedding)
            assert a.shape == b.shape == (384,) and float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


def test_a_batch_survives_a_server_restart_and_a_cancel_keeps_its_finished_lines(server, client):
    """One long batch: the server restarts under it (its Ray job goes on), then it is cancelled mid-run."""
    lines = [chat_line(f"c{i}", f"Write a long story about the number {i}.", max_tokens=64) for i in range(1200)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    server.stop()  # the replica goes away mid-batch; the job goes on
    server.start()
    again = client.batches.retrieve(batch.id)
    assert again.id == batch.id and again.request_counts.total == 1200 and again.status != "failed"
    before = again.request_counts.completed
    deadline = time.time() + 240
    while client.batches.retrieve(batch.id).request_counts.completed <= before:  # lines finish after the restart
        assert time.time() < deadline, "no line finished after the restart"
        time.sleep(0.2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = wait(client, batch.id, timeout=120)
    assert batch.status == "cancelled" and batch.cancelled_at
    outputs, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert 0 < len(outputs) < 1200 and len(outputs) == batch.request_counts.completed
    assert sorted(x["custom_id"] for x in outputs + errors) == sorted(x["custom_id"] for x in lines)
    assert all(e["response"] is None and e["error"]["code"] == "batch_cancelled" for e in errors)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)

    pages, after = [], None
    while True:
        page = client.batches.list(limit=1, after=after) if after else client.batches.list(limit=1)
        pages.append([b.id for b in page.data])
        if not page.has_more:
            break
        after = page.data[-1].id
    ids = [i for p in pages for i in p]
    assert ids[0] == batch.id and len(ids) == len(set(ids)) == 2  # the chat app's 2 batches, newest first
    assert all(len(p) <= 1 for p in pages)
    deleted = client.files.delete(batch.output_file_id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.output_file_id)


def _poll_until_done(client, batch_id: str, clients: int = 16):
    """``clients`` threads retrieving one batch at once until it ends: concurrent refreshes race to move it."""
    def poll():
        deadline = time.time() + 180
        while time.time() < deadline:
            batch = client.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                return batch.status
        return "timeout"

    with cf.ThreadPoolExecutor(clients) as pool:
        return set(pool.map(lambda _: poll(), range(clients)))


def _one_set_of_files(server, client, batch) -> None:
    """The batch's files are the ones summary.json names, each registered; no file in storage lacks a record."""
    storage = server.tmp / "storage"
    summary = json.loads((storage / "batches" / batch.id / "summary.json").read_text())
    assert summary["request_counts"] == batch.request_counts.model_dump()
    named = {(summary[k] or {}).get("id") for k in ("output_file", "error_file")} - {None}
    assert named == {batch.output_file_id, batch.error_file_id} - {None}
    for f in (storage / "files").iterdir():  # an orphan (written, never registered) would 404 here
        assert client.files.retrieve(f.name).id == f.name


def test_concurrent_polls_a_running_batchs_input_and_cancel_races_end_each_batch_once(server, client):
    """20 clients list batches while one is created (a poll between its record and its job must not fail it); its
    input cannot be deleted while it runs (409); a cancel with 16 clients polling ends it once, with one set of
    files; a short batch cancelled as it completes ends in one state too."""
    lines = [chat_line(f"r{i}", f"Write a long story about the number {i}.", max_tokens=64) for i in range(200)]
    file_id = upload(client, lines)
    created = threading.Event()

    def list_until_created():
        while not created.is_set():
            client.batches.list(limit=3)

    with cf.ThreadPoolExecutor(20) as pool:
        pollers = [pool.submit(list_until_created) for _ in range(20)]
        try:
            batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
        finally:
            created.set()
        for p in pollers:
            p.result()
    assert client.batches.retrieve(batch.id).status in ("validating", "in_progress"), batch.id
    with pytest.raises(openai.ConflictError, match=batch.id):
        client.files.delete(file_id)
    wait(client, batch.id, until=("in_progress",), timeout=240)
    assert client.batches.cancel(batch.id).status == "cancelling"
    assert _poll_until_done(client, batch.id) == {"cancelled"}
    batch = client.batches.retrieve(batch.id)
    _one_set_of_files(server, client, batch)
    answered = lines_of(client, batch.output_file_id) + lines_of(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in answered) == sorted(x["custom_id"] for x in lines)
    assert client.files.delete(file_id).deleted  # ended: its input may go

    short = client.batches.create(input_file_id=upload(client, [chat_line(f"s{i}", "Hi", max_tokens=4)
                                                                 for i in range(3)]),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait(client, short.id, until=("finalizing", "completed"), timeout=240)
    try:
        client.batches.cancel(short.id)
    except openai.ConflictError:  # it completed first
        pass
    assert len(_poll_until_done(client, short.id)) == 1
    short = client.batches.retrieve(short.id)
    assert short.status in ("completed", "cancelled") and short.request_counts.total == 3
    _one_set_of_files(server, client, short)


def test_a_batch_past_its_window_expires_with_no_client_polling_it(server, client):
    import sqlite3

    lines = [chat_line(f"e{i}", f"Write a long story about the number {i}.", max_tokens=64) for i in range(100)]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    with sqlite3.connect(server.tmp / "storage" / "batches.sqlite", timeout=30) as db:  # its 24 hours are up
        db.execute("UPDATE batches SET body = json_set(body, '$.expires_at', ?) WHERE id = ?",
                   (int(time.time()) - 1, batch.id))
    deadline = time.time() + 120
    while True:  # the database only: no request reaches the server, its replica's own poll moves the batch
        with sqlite3.connect(server.tmp / "storage" / "batches.sqlite", timeout=30) as db:
            status = db.execute("SELECT status FROM batches WHERE id = ?", (batch.id,)).fetchone()[0]
        if status == "expired":
            break
        assert time.time() < deadline, f"still {status}"
        time.sleep(1)
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "expired" and batch.expired_at
    answered = lines_of(client, batch.output_file_id) + lines_of(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in answered) == sorted(x["custom_id"] for x in lines)
    assert all(e["error"]["code"] == "batch_expired" for e in answered if e["response"] is None)


def test_the_readme_batch_snippet_runs_as_written(server, tmp_path):
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text[text.index("### Batch API"):], re.S)[1]
    assert 'client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")' in snippet
    snippet = snippet.replace("http://127.0.0.1:8000/v1", f"{URL}/v1").replace('api_key="unused"', f'api_key="{KEY}"')
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("completed") and "completed=2" in first and "failed=0" in first
    assert re.findall(r"^(q\d) ", out.stdout, re.M) == ["q0", "q1"]  # a random model's answers may hold newlines
