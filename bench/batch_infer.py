"""Throughput of jobs.batch_infer against what a user writes first, in one run.

    python bench/batch_infer.py                          # 256 prompts, smollm2-135m, 64 new tokens, greedy
    python bench/batch_infer.py --prompts 64 --loop-prompts 8

Three ways over the same prompts (the first sentences of ../shared/data/wikitext2-valid.txt paragraphs):
  plain loop      one model.generate per prompt (timed on the first --loop-prompts, it is slow)
  batched         one process, batches of --batch-size in input order, no sorting by length
  jobs.batch_infer  the Ray Data job: tokenize tasks, a model actor sorting each call's rows by length, write
Prints rows/s and generated tokens/s of each, and the ratios to the plain loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import data, models  # noqa: E402
from compress import generate as gen  # noqa: E402


def prompts_from(path: Path, n: int) -> list[str]:
    paragraphs = data.read_texts(path)
    sentences = [p.split(" . ")[0].strip() + " ." for p in paragraphs if len(p) > 80]
    return [sentences[i % len(sentences)] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--loop-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_grad_enabled(False)
    prompts = prompts_from(Path(args.text), args.prompts)
    model, tokenizer, _ = models.load(args.model)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    results = {}

    start, tokens = time.perf_counter(), 0
    for row in ids[: args.loop_prompts]:
        out = model.generate(torch.tensor([row]), max_new_tokens=args.max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - len(row)
    results["plain loop"] = (args.loop_prompts, tokens, time.perf_counter() - start)

    start, tokens = time.perf_counter(), 0
    params = [gen.SamplingParams(max_tokens=args.max_tokens)] * args.batch_size
    for i in range(0, len(ids), args.batch_size):
        chunk = ids[i : i + args.batch_size]
        tokens += sum(len(g.token_ids) for g in gen.generate(model, tokenizer, chunk, params[: len(chunk)]))
    results["batched, unsorted"] = (len(ids), tokens, time.perf_counter() - start)
    del model

    import ray

    from jobs import batch_infer

    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table({"prompt": prompts}), Path(tmp) / "prompts.parquet")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
        start = time.perf_counter()
        batch_infer.main(model=args.model, input=str(Path(tmp) / "prompts.parquet"), output=str(Path(tmp) / "out"),
                         max_tokens=args.max_tokens, batch_size=args.batch_size, num_actors=1, cpus_per_actor=1,
                         threads_per_actor=os.cpu_count())
        elapsed = time.perf_counter() - start
        table = pq.read_table(Path(tmp) / "out")
        results["jobs.batch_infer"] = (table.num_rows, sum(table.column("num_generated_tokens").to_pylist()), elapsed)
        ray.shutdown()

    base = results["plain loop"][0] / results["plain loop"][2]
    print(f"\n{args.model}, {args.prompts} prompts ({args.loop_prompts} for the plain loop), {args.max_tokens} new "
          f"tokens, greedy, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'way':<20}{'rows':>6}{'gen tokens':>12}{'seconds':>10}{'rows/s':>9}{'tokens/s':>10}{'x loop':>8}")
    for label, (rows, toks, secs) in results.items():
        print(f"{label:<20}{rows:>6}{toks:>12}{secs:>10.1f}{rows / secs:>9.2f}{toks / secs:>10.1f}"
              f"{rows / secs / base:>8.2f}")


if __name__ == "__main__":
    main()
