"""Structured outputs measured, each against the same work without them in the same run.

    python bench/structured.py                          # both parts
    python bench/structured.py --parts step --rounds 5

step  SmolLM2 (--variant, int8 by default) decodes --batch requests at once, every one held to a JSON schema; the
      time the grammars take (each row's token bitmask filled and applied, engine.logits.shape_) as a share of the
      engine's step time, and the step time against the same requests unguided. Medians over --rounds.
job   jobs.batch_infer on a local Ray over --rows prompts asking for a JSON record, with --json-schema and without,
      alternating over --job-rounds: rows/s of each (the ratio), rows out = rows in, and how many of the schema run's
      answers parse and validate (the others must say why: finish_reason length or an error).
Prints the CPU beside the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine.core as core  # noqa: E402
from compress import data, models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from engine.core import Engine  # noqa: E402
from engine.sampling import Guided, SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "year": {"type": "integer", "minimum": 1800, "maximum": 2030},
    "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action", "documentary", "horror"]},
               "maxItems": 3},
    "summary": {"type": "string", "maxLength": 160}}, "required": ["title", "year", "genres", "summary"]}
TOPICS = ["a film about the sea", "a comedy set in Paris", "a documentary on bees", "a horror film in a castle",
          "an action film on a train", "a drama about a family farm", "a film about space travel",
          "a comedy about two chefs"]


def prompt_text(k: int) -> str:
    return f"Describe {TOPICS[k % len(TOPICS)]} (number {k}) as a JSON record with title, year, genres and summary."


def step_share(model, tokenizer, batch: int, max_tokens: int, guided: bool) -> dict:
    """Decode ``batch`` requests together; the grammars' time and the steps' time."""
    engine = Engine(model, tokenizer, max_num_seqs=batch, max_model_len=1024)
    prompts = [data.prompt_ids(tokenizer, data.chat_text(tokenizer, [{"role": "user", "content": prompt_text(k)}]),
                               templated=True) for k in range(batch)]
    spec = Guided("json_schema", json.dumps(SCHEMA)) if guided else None
    params = [SamplingParams(max_tokens=max_tokens, guided=spec, ignore_eos=not guided)] * batch
    engine.generate(prompts[:2], [SamplingParams(max_tokens=2, guided=spec)] * 2)  # warm: kernels, grammar cache
    shaped = [0.0]
    real = core.shape_

    def timed(*args, **kw):
        start = time.perf_counter()
        real(*args, **kw)
        shaped[0] += time.perf_counter() - start

    core.shape_ = timed
    try:
        before = engine.metrics.steps
        start = time.perf_counter()
        results = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
    finally:
        core.shape_ = real
    steps = engine.metrics.steps - before
    tokens = sum(len(r.token_ids) for r in results)
    valid = sum(r.finish_reason == "stop" for r in results) if guided else None
    return {"ms_per_step": 1000 * seconds / steps, "grammar_ms_per_step": 1000 * shaped[0] / steps,
            "tokens_per_step": tokens / steps, "finished": valid}


def job_run(model: str, rows: int, schema: bool, folder: Path, batch: int) -> dict:
    from jobs import batch_infer

    source = folder / "in.jsonl"
    if not source.exists():
        source.write_text("".join(json.dumps({"id": k, "prompt": prompt_text(k)}) + "\n" for k in range(rows)))
    out = folder / f"out-{'schema' if schema else 'free'}-{time.monotonic_ns()}"
    start = time.perf_counter()
    rc = batch_infer.main(model=model, input=str(source), output=str(out), chat=True, max_tokens=96,
                          batch_size=batch, json_schema=json.dumps(SCHEMA) if schema else None)
    seconds = time.perf_counter() - start
    import jsonschema
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    valid = 0
    for r in table:
        if r["error"] is None and r["finish_reason"] == "stop":
            try:
                jsonschema.validate(json.loads(r["generated_text"]), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    unexplained = sum(1 for r in table if schema and r["error"] is None and r["finish_reason"] == "stop"
                      and not _parses(r["generated_text"]))
    tokens = sum(r["num_generated_tokens"] or 0 for r in table)
    return {"rc": rc, "rows_out": len(table), "rows_per_s": len(table) / seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_row": tokens / len(table), "valid": valid,
            "length": sum(r["finish_reason"] == "length" for r in table), "errors": sum(r["error"] is not None
                                                                                         for r in table),
            "broken_without_reason": unexplained}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variant", default="int8", help="the step part's variant (a spec, or float32)")
    parser.add_argument("--parts", nargs="+", default=["step", "job"], choices=["step", "job"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--job-rounds", type=int, default=1)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"CPU: {cpu_description()}", flush=True)
    if "step" in args.parts:
        base, tokenizer, _ = models.load(args.model)
        model = base if args.variant == "float32" else copy.deepcopy(base)
        if args.variant != "float32":
            specs.apply_(model, args.variant)  # in place
        runs = {True: [], False: []}
        for r in range(args.rounds):
            for guided in ((True, False) if r % 2 == 0 else (False, True)):
                runs[guided].append(step_share(model, tokenizer, args.batch, args.max_tokens, guided))
                print(f"round {r + 1} guided={guided}: {runs[guided][-1]}", file=sys.stderr, flush=True)
        med = {g: {k: statistics.median(x[k] for x in v) for k in v[0] if k != "finished"} for g, v in runs.items()}
        g, f = med[True], med[False]
        print(f"step, {args.model} {args.variant}, {args.batch} requests at once, medians of {args.rounds}: "
              f"grammars {g['grammar_ms_per_step']:.2f} ms of a {g['ms_per_step']:.1f} ms step "
              f"({100 * g['grammar_ms_per_step'] / g['ms_per_step']:.1f}%); unguided step {f['ms_per_step']:.1f} ms "
              f"({g['ms_per_step'] / f['ms_per_step']:.2f}x); guided requests that ended with whole JSON: "
              f"{[x['finished'] for x in runs[True]]} of {args.batch}")
    if "job" in args.parts:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        runs = {True: [], False: []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.job_rounds):
                for schema in ((True, False) if r % 2 == 0 else (False, True)):
                    runs[schema].append(job_run(args.model, args.rows, schema, Path(tmp), args.batch))
                    print(f"round {r + 1} schema={schema}: {runs[schema][-1]}", file=sys.stderr, flush=True)
        med = {g: {k: statistics.median(x[k] for x in v) for k in ("rows_per_s", "tokens_per_s", "tokens_per_row")}
               for g, v in runs.items()}
        s, f, last = med[True], med[False], runs[True][-1]
        print(f"job, {args.model} float32, {args.rows} rows, batch {args.batch}: generated tokens/s with the schema "
              f"{s['tokens_per_s']:.1f}, without {f['tokens_per_s']:.1f} "
              f"({s['tokens_per_s'] / f['tokens_per_s']:.2f}x); "
              f"rows/s {s['rows_per_s']:.3f} vs {f['rows_per_s']:.3f} (answers of {s['tokens_per_row']:.0f} vs "
              f"{f['tokens_per_row']:.0f} tokens); rows out {last['rows_out']} of {args.rows}; valid JSON "
              f"{last['valid']}, ended by length {last['length']}, errors {last['errors']}, broken without a "
              f"reason {last['broken_without_reason']}")


if __name__ == "__main__":
    main()
