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

    python bench/serve_load.py --peer path/to/llama-server --variant int8   # llama.cpp's server against raypress

With --peer, the config's model is compressed by raypress to --variant, saved as an artifact and exported by raypress
to GGUF (int8 -> Q8_0, int4s-gN -> Q4_0, int4-gN -> Q4_1), so both servers read the same weights: llama.cpp's
``llama-server`` (built from the source the bench extra vendors; see README) runs the export with one slot per
max_num_seqs, a context of max_num_seqs x max_model_len and num_threads threads, and ``serve run``'s application
runs the artifact with the config's args. Each round runs both, alternating which goes first; only the one being
measured is up while it is.

Each run also prints where the machine's CPU went (CPU seconds of every process over the run, grouped: the Serve
replica, Serve's HTTP proxy, the rest of Ray, llama-server, this process's client threads, anything else), and
with --profile the Serve replica is sampled by py-spy (pip install py-spy) during its first measured run and its
samples are split into the engine step's parts: prefill and decode products, attention, sampling, detokenizing,
scheduling, and the replica's request handling outside the engine.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PORT = 8021
PEER_PORT = 8023


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


class ServeApp:
    """One setting of serve config's application, deployed on the running Serve as "bench" while it is measured."""

    def __init__(self, app_args: dict, deployment: dict):
        self.app_args, self.deployment = app_args, deployment
        self.url = f"http://127.0.0.1:{PORT}/bench"

    def up(self) -> None:
        from ray import serve

        from serve.app import ModelServer, server_args

        app = ModelServer.options(**self.deployment).bind(**server_args({**self.app_args, "model_name": "bench"}))
        serve.run(app, name="bench", route_prefix="/bench")

    def stats(self) -> dict | None:
        import requests

        return requests.get(f"{self.url}/stats", timeout=30).json()

    def down(self) -> None:
        from ray import serve

        serve.delete("bench")


class LlamaServer:
    """llama.cpp's server on a GGUF file, started for each measured run and stopped after it."""

    def __init__(self, binary: Path, gguf: Path, slots: int, max_model_len: int, threads: int):
        self.command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(PEER_PORT),
                        "-np", str(slots), "-c", str(slots * max_model_len), "-t", str(threads), "-tb", str(threads),
                        "--alias", "bench", "--no-webui"]
        self.url = f"http://127.0.0.1:{PEER_PORT}"
        self.process: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])

    def up(self) -> None:
        import requests

        self.process = subprocess.Popen(self.command, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"llama-server exited with {self.process.returncode}; its log: {self.log}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        self.down()
        sys.exit(f"llama-server did not answer /health within 300 s; its log: {self.log}")

    def stats(self) -> None:
        return None

    def down(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def _process_groups() -> dict[int, tuple[str, float]]:
    """Every process's group (what it is to this benchmark) and CPU seconds so far, by pid (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        pid = int(entry.name)
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        out[pid] = (_group(pid, command), seconds)
    return out


def _group(pid: int, command: str) -> str:
    if pid == os.getpid():
        return "clients (this process)"
    for needle, group in (("ServeReplica", "Serve replica"), ("ProxyActor", "Serve HTTP proxy"),
                          ("llama-server", "llama-server"), ("ray", "Ray (GCS, raylet, controller)")):
        if needle in command:
            return group
    return "other processes"


def cpu_shares(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """CPU seconds per group between two readings of _process_groups, as a share of every core over ``seconds``."""
    total: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        total[group] = total.get(group, 0.0) + cpu - before.get(pid, (group, 0.0))[1]
    cores = os.cpu_count() or 1
    return {g: c / (seconds * cores) for g, c in sorted(total.items(), key=lambda kv: -kv[1]) if c > 0.05}


# py-spy's stacks of the replica, as parts of the work: the first rule whose words are all in a stack takes it
PROFILE_RULES = (
    ("attention", ("engine/core.py", "decode_attention")),
    ("attention", ("engine/core.py", "attend (")),
    ("RoPE and cache write", ("engine/core.py", "_rope_write")),
    ("linear products", ("engine/core.py", "<lambda> (", "engine/lean.py")),
    ("linear products", ("engine/core.py", "engine/lean.py", "compress/qmodules.py")),
    ("norms and SiLU", ("engine/core.py", "compress/kernels.py")),
    ("forward: other ops and Python", ("engine/core.py", "forward (")),
    ("sampling", ("engine/core.py", "engine/sampling.py")),
    ("sampling", ("engine/core.py", "engine/logits.py")),
    ("output (detokenize, stop strings)", ("engine/core.py", "engine/output.py")),
    ("output (detokenize, stop strings)", ("engine/core.py", "_publish")),
    ("schedule and pack", ("engine/core.py", "engine/scheduler.py")),
    ("schedule and pack", ("engine/core.py", "engine/blocks.py")),
    ("schedule and pack", ("engine/core.py", "engine/kvcache.py")),
    ("schedule and pack", ("engine/core.py", "pack (")),
    ("engine: other", ("engine/core.py",)),
)


def profile_split(raw: str) -> dict[str, float]:
    """Shares of py-spy's samples (``--format raw``: 'frame;frame;... count' lines, root first) by PROFILE_RULES;
    stacks outside the engine's thread are the replica's request handling (HTTP bodies, Ray's calls, asyncio)."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        part = next((name for name, words in PROFILE_RULES if all(w in stack for w in words)),
                    "replica: requests outside the engine")
        counts[part] = counts.get(part, 0) + int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def py_spy() -> str | None:
    """py-spy's executable: on PATH, or beside this Python (a venv's, not activated)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def replica_pid() -> int | None:
    for pid, (group, _) in _process_groups().items():
        if group == "Serve replica":
            return pid
    return None


def measure(setting, load: list[dict], clients: int, profile: Path | None) -> dict:
    """One measured run of ``load`` against a setting that is up: the client's figures, where the CPU went, and (for
    raypress) the engine's steps over the run."""
    spy = None
    if profile is not None and isinstance(setting, ServeApp) and (pid := replica_pid()) is not None:
        spy = subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--rate", "50", "--nonblocking", "--format",
                                "raw", "--output", str(profile)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before, stats_before = _process_groups(), setting.stats()
    result = drive(setting.url, "bench", load, clients)
    after, stats_after = _process_groups(), setting.stats()
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples when interrupted
        spy.wait(timeout=60)
        result["profile"] = profile_split(profile.read_text()) if profile.exists() else {}
    result["cpu"] = cpu_shares(before, after, result["seconds"])
    if stats_before is not None:
        steps = stats_after["steps"] - stats_before["steps"]
        phases = {k: v - stats_before["step_phase_seconds"][k] for k, v in stats_after["step_phase_seconds"].items()}
        result["engine"] = {"steps": steps, "busy": sum(phases.values()) / result["seconds"],
                            "phases": {k: v / result["seconds"] for k, v in phases.items()}}
    return result


def make_variant(model_name: str, spec: str, workdir: Path) -> tuple[Path, Path]:
    """raypress's ``spec`` of ``model_name``, saved as an artifact and exported to GGUF: (artifact folder, .gguf)."""
    from compress import artifact, gguf_export, models, specs

    model, tokenizer = models.load(model_name)[:2]
    specs.apply_(model, spec)
    folder = artifact.save(model, tokenizer, workdir / spec, {"spec": spec})
    gguf = gguf_export.write(model, tokenizer, workdir / f"{spec}.gguf", f"{model_name} {spec}")
    return folder, gguf


def main() -> None:
    parser = parser_for(__doc__, requests=96, rounds=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--engine", choices=["raypress", "vllm"], default="raypress",
                        help="vllm: compare engine: vllm with engine: raypress (same args) instead of max_num_seqs=1")
    parser.add_argument("--peer", type=Path, metavar="LLAMA_SERVER",
                        help="a llama-server binary: compare llama.cpp's server on raypress's GGUF export of --variant "
                             "with serve run on the artifact, instead of max_num_seqs=1")
    parser.add_argument("--variant", default="int8", help="with --peer: the spec both serve (default int8)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the Serve replica with py-spy during its first run and split the samples")
    args = parser.parse_args()
    if args.peer is not None and args.engine != "raypress":
        sys.exit("--peer compares llama-server with raypress's engine: leave --engine out")
    if args.peer is not None and not (args.peer.is_file() and os.access(args.peer, os.X_OK)):
        sys.exit(f"--peer {args.peer}: not an executable file (make llama-server builds .peers/llama-server)")
    if args.profile and py_spy() is None:
        sys.exit("--profile needs py-spy (pip install py-spy)")
    import ray
    from ray import serve

    app_args, deployment, load = application(args)
    settings: dict[str, ServeApp | LlamaServer] = {
        f"max_num_seqs={app_args.get('max_num_seqs', 16)}": ServeApp(app_args, deployment),
        "max_num_seqs=1": ServeApp({**app_args, "max_num_seqs": 1}, deployment)}
    if args.engine == "vllm":
        settings = {"engine: vllm": ServeApp({**app_args, "engine": "vllm"}, deployment),
                    "engine: raypress": ServeApp(app_args, deployment)}
    workdir = Path(tempfile.mkdtemp(prefix="raypress-serve-load-"))
    if args.peer is not None:
        folder, gguf = make_variant(app_args.get("model", "smollm2-135m"), args.variant, workdir)
        print(f"{args.variant}: artifact {folder}, GGUF export {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)",
              file=sys.stderr)
        slots, max_len = app_args.get("max_num_seqs", 16), app_args.get("max_model_len", 2048)
        settings = {f"raypress {args.variant}": ServeApp({**app_args, "model": str(folder)}, deployment),
                    "llama-server": LlamaServer(args.peer, gguf, slots, max_len, app_args.get("num_threads", 2))}
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    results: dict[str, list[dict]] = {label: [] for label in settings}
    profile = workdir / "replica.pyspy" if args.profile else None
    try:
        for r in range(args.rounds):
            order = list(settings) if r % 2 == 0 else list(reversed(settings))
            for label in order:
                setting = settings[label]
                setting.up()
                try:
                    drive(setting.url, "bench", load[:4], 4)  # warm-up
                    results[label].append(measure(setting, load, args.clients, profile))
                finally:
                    setting.down()
                if "profile" in results[label][-1]:
                    profile = None  # the first run of a Serve setting is sampled
                print(f"round {r + 1} {label}: {results[label][-1]}", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    report(args, app_args, results)


def report(args, app_args: dict, results: dict[str, list[dict]]) -> None:
    from compress.cpu import cpu_description

    model = f"{app_args.get('model')} {args.variant}" if args.peer else app_args.get("model")
    print(f"\n{model} via {Path(args.config).name}: {args.clients} clients, {args.requests} chat requests (prompts "
          f"10-300 tokens, max_tokens 16-128, greedy, half streamed), medians of {args.rounds} round(s)\n"
          f"CPU: {cpu_description()}")
    print(f"{'setting':<20}{'ok':>5}{'errors':>8}{'seconds':>9}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p95':>10}"
          f"{'lat p50':>9}{'lat p95':>9}")
    med = {}
    for label, runs in results.items():
        med[label] = {k: statistics.median(x[k] for x in runs) for k in runs[0]
                      if isinstance(runs[0][k], int | float)}
        m = med[label]
        print(f"{label:<20}{m['requests']:>5.0f}{m['errors']:>8.0f}{m['seconds']:>9.1f}{m['tokens_per_s']:>11.1f}"
              f"{m['ttft_p50']:>10.2f}{m['ttft_p95']:>10.2f}{m['lat_p50']:>9.2f}{m['lat_p95']:>9.2f}")
        if any(x["first_error"] for x in runs):
            print(f"  first error: {next(x['first_error'] for x in runs if x['first_error'])}")
    (a, first), (b, second) = ((label, med[label]) for label in results)
    ratio = first["tokens_per_s"] / max(second["tokens_per_s"], 1e-9)
    print(f"{a} / {b}: output tokens/s {ratio:.2f}x, TTFT p50 {first['ttft_p50'] / second['ttft_p50']:.2f}x "
          "(lower is sooner)")
    print("\nwhere the CPU went (share of all cores over each run; medians):")
    for label, runs in results.items():
        groups = {g for x in runs for g in x["cpu"]}
        shares = {g: statistics.median(x["cpu"].get(g, 0.0) for x in runs) for g in groups}
        print(f"  {label}: " + ", ".join(f"{g} {v:.0%}" for g, v in sorted(shares.items(), key=lambda kv: -kv[1])))
        engine = [x["engine"] for x in runs if "engine" in x]
        if engine:
            phases = {k: statistics.median(e["phases"][k] for e in engine) for k in engine[0]["phases"]}
            print(f"    engine steps: {statistics.median(e['steps'] for e in engine):.0f} per run, busy "
                  f"{statistics.median(e['busy'] for e in engine):.0%} of the run: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in phases.items()))
        spied = next((x["profile"] for x in runs if x.get("profile")), None)
        if spied:
            print("    py-spy samples of the replica (first run): "
                  + ", ".join(f"{k} {v:.0%}" for k, v in spied.items()))


if __name__ == "__main__":
    main()
