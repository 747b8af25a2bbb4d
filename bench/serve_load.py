"""Serving throughput with request batching on against max_batch_size=1, in one run, on loopback.

    python bench/serve_load.py                        # smollm2-135m, 16 clients, 20 s per setting
    python bench/serve_load.py --clients 8 --seconds 10 --max-tokens 32

Starts a local Ray and Serve on 127.0.0.1, deploys the model twice (batched and unbatched, one replica each,
one after the other), and drives each with the same bounded closed-loop load: every client sends a chat request,
waits for the answer, and sends the next, until the time is up. Prints requests/s, tokens/s, p50/p99 latency
and the ratio of batched to unbatched throughput.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PORT = 8021
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Why is the sky blue?", "What is 2+2?",
             "Give me a tip for writing emails.", "What is a black hole?", "Describe a cat.", "How do plants grow?"]


def drive(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    deadline = time.time() + seconds
    latencies, tokens, errors = [], [], 0

    def client(k: int):
        nonlocal errors
        i = k
        while time.time() < deadline:
            body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": max_tokens, "temperature": 0}
            start = time.perf_counter()
            r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
                tokens.append(r.json()["usage"]["completion_tokens"])
            else:
                errors += 1
            i += clients

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {"requests": len(lat), "errors": errors, "req_per_s": len(lat) / elapsed,
            "tokens_per_s": sum(tokens) / elapsed, "p50_s": statistics.median(lat) if lat else float("nan"),
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from serve.app import ModelServer, server_args

    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    threads = os.cpu_count() or 1
    results = {}
    for label, batch in (("batched", args.max_batch_size), ("max_batch_size=1", 1)):
        app = ModelServer.options(max_ongoing_requests=args.clients + 4, ray_actor_options={"num_cpus": 1}).bind(
            **server_args({"model": args.model, "max_batch_size": batch, "num_threads": threads,
                           "batch_wait_timeout_s": args.batch_wait_timeout_s}))
        serve.run(app, name="bench", route_prefix="/bench")
        url = f"http://127.0.0.1:{PORT}/bench"
        drive(url, 2, 3, 4)  # warm-up
        results[label] = drive(url, args.clients, args.seconds, args.max_tokens)
        results[label]["mean_batch"] = statistics.fmean(
            requests.get(f"{url}/stats", timeout=30).json()["batch_sizes"] or [1])
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    print(f"\n{args.model}: {args.clients} clients, {args.seconds:.0f} s each, {args.max_tokens} new tokens, "
          f"greedy; {threads} CPU threads per replica")
    print(f"{'setting':<18}{'requests':>9}{'errors':>8}{'req/s':>9}{'tokens/s':>10}{'p50 s':>8}{'p99 s':>8}"
          f"{'mean batch':>12}")
    for label, r in results.items():
        print(f"{label:<18}{r['requests']:>9}{r['errors']:>8}{r['req_per_s']:>9.2f}{r['tokens_per_s']:>10.1f}"
              f"{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}{r['mean_batch']:>12.1f}")
    ratio = results["batched"]["req_per_s"] / max(results["max_batch_size=1"]["req_per_s"], 1e-9)
    print(f"throughput, batched / max_batch_size=1: {ratio:.2f}x")


if __name__ == "__main__":
    main()
