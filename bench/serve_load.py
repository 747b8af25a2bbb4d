"""Serving under a mixed chat load: the engine's continuous batching against max_num_seqs=1, in one run.

    python bench/serve_load.py                          # serve/config.yaml's model, 16 clients, 96 requests, 2 rounds
    python bench/serve_load.py --clients 8 --requests 32 --rounds 1

Starts a local Ray and Serve on 127.0.0.1 and deploys serve/config.yaml's application twice per round (its args,
with max_num_seqs as configured and with max_num_seqs=1), alternating the two settings round by round. Each run
sends the same seeded workload with the official openai client from --clients threads: chat requests whose prompts
are 10 to ~300 tokens, max_tokens 16 to 128, greedy, half of them with stream: true. Prints output tokens/s, time to
first token (streamed requests) and latency percentiles per setting (medians over rounds), and the ratio.

    .venv-vllm/bin/python bench/serve_load.py --engine vllm   # engine: vllm against engine: raypress instead

With --engine vllm the two settings are the same args on vLLM (engine.vllm_server; its CPU backend here) and on
raypress's engine: the first peer figure for serving, under the same load and the same routes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PORT = 8021


def workload(tokenizer, n: int, seed: int, text_file: Path) -> list[dict]:
    """n chat requests: (messages, max_tokens, stream), prompts cut from real text to 10..300 tokens."""
    from compress import data

    rng = random.Random(seed)
    source = " ".join(data.read_texts(text_file)[:400]) if text_file.exists() else " ".join(data.BUILTIN_PROMPTS * 8)
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    out = []
    for k in range(n):
        length = int(10 * 30 ** rng.random())  # 10..300 tokens, more short prompts than long ones
        start = rng.randrange(0, len(ids) - length)
        text = tokenizer.decode(ids[start : start + length])
        out.append({"messages": [{"role": "user", "content": f"Continue this text: {text}"}],
                    "max_tokens": rng.randint(16, 128), "stream": k % 2 == 1})
    return out


def drive(base_url: str, model: str, requests: list[dict], clients: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=900)
    todo, lock = list(enumerate(requests)), threading.Lock()
    ttft, latency, tokens, errors = [], [], [], []

    def one(req: dict) -> None:
        start = time.perf_counter()
        kw = {"model": model, "messages": req["messages"], "max_tokens": req["max_tokens"], "temperature": 0}
        if req["stream"]:
            first, n = None, 0
            for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - start
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            ttft.append(first if first is not None else time.perf_counter() - start)
        else:
            n = client.chat.completions.create(**kw).usage.completion_tokens
        latency.append(time.perf_counter() - start)
        tokens.append(n)

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                _, req = todo.pop(0)
            try:
                one(req)
            except Exception as e:  # counted and reported, never hidden
                errors.append(repr(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "requests": len(latency), "errors": len(errors), "tokens_per_s": sum(tokens) / elapsed,
            "ttft_p50": _pct(ttft, 50), "ttft_p95": _pct(ttft, 95), "lat_p50": _pct(latency, 50),
            "lat_p95": _pct(latency, 95), "first_error": errors[0] if errors else ""}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def parser_for(doc: str, requests: int, rounds: int) -> argparse.ArgumentParser:
    """The flags both serving benchmarks take: the Serve config, the workload's size and seed, rounds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "serve" / "config.yaml"))
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"))
    return parser


def application(args) -> tuple[dict, dict, list[dict]]:
    """serve config's first application -> (its args, its deployment options for one replica, the workload)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from compress import models

    app_config = yaml.safe_load(Path(args.config).read_text())["applications"][0]
    app_args = dict(app_config.get("args") or {})
    deployment = dict((app_config.get("deployments") or [{}])[0])
    deployment.pop("name", None)
    deployment.pop("autoscaling_config", None)  # one replica: the comparison is the engine's
    tokenizer = models.tokenizer_for(app_args.get("model", models.DEFAULT_MODEL))[0]
    return app_args, {**deployment, "num_replicas": 1}, workload(tokenizer, args.requests, args.seed, Path(args.text))


def main() -> None:
    parser = parser_for(__doc__, requests=96, rounds=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--engine", choices=["raypress", "vllm"], default="raypress",
                        help="vllm: compare engine: vllm with engine: raypress (same args) instead of max_num_seqs=1")
    args = parser.parse_args()
    import ray
    from ray import serve

    from serve.app import ModelServer, server_args

    app_args, deployment, load = application(args)
    settings = {f"max_num_seqs={app_args.get('max_num_seqs', 16)}": app_args, "max_num_seqs=1": {**app_args,
                                                                                                  "max_num_seqs": 1}}
    if args.engine == "vllm":
        settings = {"engine: vllm": {**app_args, "engine": "vllm"}, "engine: raypress": app_args}
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    results: dict[str, list[dict]] = {label: [] for label in settings}
    for r in range(args.rounds):
        order = list(settings) if r % 2 == 0 else list(reversed(settings))
        for label in order:
            app = ModelServer.options(**deployment).bind(
                **server_args({**settings[label], "model_name": "bench"}))
            serve.run(app, name="bench", route_prefix="/bench")
            url = f"http://127.0.0.1:{PORT}/bench"
            drive(url, "bench", load[:4], 4)  # warm-up
            results[label].append(drive(url, "bench", load, args.clients))
            print(f"round {r + 1} {label}: {results[label][-1]}", file=sys.stderr, flush=True)
            serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    from compress.cpu import cpu_description

    cpu = cpu_description()
    print(f"\n{app_args.get('model')} via {Path(args.config).name}: {args.clients} clients, {args.requests} chat "
          f"requests (prompts 10-300 tokens, max_tokens 16-128, greedy, half streamed), medians of {args.rounds} "
          f"round(s)\nCPU: {cpu}")
    print(f"{'setting':<17}{'ok':>5}{'errors':>8}{'seconds':>9}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p95':>10}"
          f"{'lat p50':>9}{'lat p95':>9}")
    med = {}
    for label, runs in results.items():
        med[label] = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "first_error"}
        m = med[label]
        print(f"{label:<17}{m['requests']:>5.0f}{m['errors']:>8.0f}{m['seconds']:>9.1f}{m['tokens_per_s']:>11.1f}"
              f"{m['ttft_p50']:>10.2f}{m['ttft_p95']:>10.2f}{m['lat_p50']:>9.2f}{m['lat_p95']:>9.2f}")
        if any(x["first_error"] for x in runs):
            print(f"  first error: {next(x['first_error'] for x in runs if x['first_error'])}")
    (a, first), (b, second) = ((label, med[label]) for label in settings)
    ratio = first["tokens_per_s"] / max(second["tokens_per_s"], 1e-9)
    print(f"output tokens/s, {a} / {b}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
