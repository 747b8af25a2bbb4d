"""The Batch API against the same requests sent one by one to the synchronous endpoint, in one run.

    python bench/batch_api.py                        # serve/config.yaml's model, 256 chat requests, 1 round
    python bench/batch_api.py --requests 64 --rounds 3

Starts a local Ray (with its job API) and Serve on 127.0.0.1 and deploys serve/config.yaml's application once. Each
round sends the seeded workload of bench/serve_load.py (chat requests with prompts of 10 to ~300 tokens, max_tokens
16 to 128, greedy) two ways, alternating which goes first: one request at a time to /v1/chat/completions with the
official openai client, and as one batch (files.create, batches.create, poll until completed, files.content). The
batch's time includes the upload, the job's start and model load, and the download. Prints requests/s and output
tokens/s of each way (medians over rounds) and the ratio, with the CPU.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PORT = 8023


def one_by_one(client, model: str, load: list[dict]) -> dict:
    start, tokens = time.perf_counter(), 0
    for req in load:
        reply = client.chat.completions.create(model=model, messages=req["messages"], max_tokens=req["max_tokens"],
                                               temperature=0)
        tokens += reply.usage.completion_tokens
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "requests": len(load), "failed": 0}


def as_batch(client, load: list[dict]) -> dict:
    start = time.perf_counter()
    lines = [{"custom_id": f"r{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": req["messages"], "max_tokens": req["max_tokens"], "temperature": 0}}
             for k, req in enumerate(load)]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    upload = client.files.create(file=("bench.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    if batch.status != "completed":
        raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch.errors}")
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    tokens = sum(x["response"]["body"]["usage"]["completion_tokens"] for x in out)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "requests": len(out),
            "failed": batch.request_counts.failed}


def main() -> None:
    from bench.serve_load import application, parser_for

    args = parser_for(__doc__, requests=256, rounds=1).parse_args()
    import openai
    import ray
    from ray import serve

    from compress.cpu import cpu_description
    from serve.app import ModelServer, server_args

    app_args, deployment, load = application(args)
    storage = tempfile.mkdtemp(prefix="raypress-bench-batches-")
    # 4 logical CPUs on 2 cores: the replica (1) and the batch job's actor (2, so 2 torch threads as the replica has)
    ray.init(num_cpus=4, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = ModelServer.options(**deployment).bind(**server_args(
        {**app_args, "model_name": "bench", "batch_storage": storage, "batch_cpus_per_actor": 2}))
    serve.run(app, name="bench", route_prefix="/bench")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/bench/v1", api_key=os.environ.get(
        "RAYPRESS_API_KEY", "unused"), max_retries=0, timeout=3600)
    one_by_one(client, "bench", load[:2])  # warm-up
    results = {"one by one": [], "batch": []}
    for r in range(args.rounds):
        for way in (["one by one", "batch"] if r % 2 == 0 else ["batch", "one by one"]):
            results[way].append(one_by_one(client, "bench", load) if way == "one by one" else as_batch(client, load))
            print(f"round {r + 1} {way}: {results[way][-1]}", file=sys.stderr, flush=True)
    serve.shutdown()
    ray.shutdown()
    print(f"\n{app_args.get('model')} via {Path(args.config).name}: {args.requests} chat requests (prompts 10-300 "
          f"tokens, max_tokens 16-128, greedy), medians of {args.rounds} round(s)\nCPU: {cpu_description()}")
    print(f"{'way':<12}{'requests':>9}{'failed':>8}{'seconds':>9}{'requests/s':>12}{'out tok/s':>11}")
    med = {}
    for way, runs in results.items():
        med[way] = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        m = med[way]
        print(f"{way:<12}{m['requests']:>9.0f}{m['failed']:>8.0f}{m['seconds']:>9.1f}"
              f"{m['requests'] / m['seconds']:>12.2f}{m['tokens'] / m['seconds']:>11.1f}")
    print(f"batch / one by one, requests per second: {med['one by one']['seconds'] / med['batch']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
