"""Batch generation throughput with mixed max_tokens: the engine against static sub-batches, in one run.

    python bench/batch_infer.py                         # 64 prompts, max_tokens 8..256, smollm2-135m, 3 rounds
    python bench/batch_infer.py --prompts 32 --rounds 1 --job

Ways over the same prompts (sentences of ../shared/data/wikitext2-valid.txt, or built-in prompts without it), each
row with its own seeded max_tokens in 8..256, greedy, after a warm-up, alternating order round by round:
  plain loop      one model.generate per prompt (what a user writes first), on --loop-prompts rows spread over
                  the prompts (it is slow); "engine, loop rows" runs the engine on exactly those rows, so the two
                  are compared on the same work
  static          what jobs.batch_infer did before the engine: rows sorted by length, sub-batches of --batch-size,
                  each run until its longest row ends (a left-padded prefill, then one forward per step)
  engine          engine.core: every row queued at once, a row starts as soon as a slot frees up
  vllm            with --engine vllm: vLLM's engine (engine.vllm; its CPU backend in float32 here, eager) on the same
                  rows and settings (run it from .venv-vllm: make venv-vllm)
  jobs.batch_infer  with --job: the whole Ray Data job (read, tokenize, actor, write), once, after the rounds
Prints generated tokens/s of each (medians over rounds) and the ratios to static.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import data, models  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from engine.core import Engine  # noqa: E402
from engine.output import eos_ids  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def prompts_from(path: Path, n: int) -> list[str]:
    if path.exists():
        sentences = [p.split(" . ")[0].strip() + " ." for p in data.read_texts(path) if len(p) > 80]
    else:
        sentences = list(data.BUILTIN_PROMPTS)
    return [sentences[i % len(sentences)] for i in range(n)]


@torch.inference_mode()
def static_generate(model, tokenizer, prompts: list[list[int]], max_tokens: list[int]) -> int:
    """The pre-engine path: one left-padded batch run until its longest row is done. Returns generated tokens."""
    n, width = len(prompts), max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits, last_pos = out.cache, out.logits[:, -1], positions[:, -1:]
    eos, produced, done = eos_ids(model, tokenizer), [0] * n, [False] * n
    for _ in range(max(max_tokens)):
        next_ids = logits.argmax(-1)
        for i in range(n):
            if not done[i]:
                if int(next_ids[i]) in eos:
                    done[i] = True
                else:
                    produced[i] += 1
                    done[i] = produced[i] >= max_tokens[i]
        if all(done):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=last_pos, cache=cache,
                    use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]
    return sum(produced)


def run_static(model, tokenizer, ids, max_tokens, batch_size) -> int:
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # as the old actor did: similar lengths together
    total = 0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        total += static_generate(model, tokenizer, [ids[i] for i in rows], [max_tokens[i] for i in rows])
    return total


def run_engine(engine, ids, max_tokens) -> int:
    results = engine.generate(ids, [SamplingParams(max_tokens=m) for m in max_tokens])
    return sum(len(g.token_ids) for g in results)


@torch.inference_mode()
def run_loop(model, tokenizer, ids, max_tokens) -> int:
    total, eos = 0, eos_ids(model, tokenizer)
    for row, m in zip(ids, max_tokens, strict=True):
        out = model.generate(torch.tensor([row]), max_new_tokens=m, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        total += sum(1 for t in out[0, len(row) :].tolist() if t not in eos)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--loop-prompts", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--job", action="store_true", help="also time the whole Ray Data job once")
    parser.add_argument("--engine", choices=["raypress", "vllm"], default="raypress",
                        help="vllm: also time vLLM's engine on the same rows, beside raypress's")
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = prompts_from(Path(args.text), args.prompts)
    rng = random.Random(0)
    max_tokens = [rng.randint(args.min_tokens, args.max_tokens) for _ in prompts]
    model, tokenizer, _ = models.load(args.model)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    engine = Engine(model, tokenizer, max_num_seqs=args.batch_size)
    step = max(1, len(ids) // args.loop_prompts)
    loop_rows = list(range(0, len(ids), step))[: args.loop_prompts]  # spread over the rows, not the first few
    loop_ids, loop_max = [ids[i] for i in loop_rows], [max_tokens[i] for i in loop_rows]
    ways = {
        "plain loop": lambda: run_loop(model, tokenizer, loop_ids, loop_max),
        "engine, loop rows": lambda: run_engine(engine, loop_ids, loop_max),
        "static": lambda: run_static(model, tokenizer, ids, max_tokens, args.batch_size),
        "engine": lambda: run_engine(engine, ids, max_tokens),
    }
    if args.engine == "vllm":  # the two engines side by side (vLLM's venv pins an older transformers, whose
        from engine.vllm import VllmEngine  # generate the plain and static ways are not written for)

        theirs = VllmEngine(models.resolve(args.model), max_num_seqs=args.batch_size,
                            max_model_len=max(len(i) for i in ids) + args.max_tokens)
        ways = {"engine": ways["engine"], "vllm": lambda: run_engine(theirs, ids, max_tokens)}
        run_engine(theirs, ids[:4], [4] * 4)
    else:  # warm-up: every way once on a little work, so that none pays first-call costs inside the timing
        run_static(model, tokenizer, ids[:4], [4] * 4, 4), run_loop(model, tokenizer, ids[:1], [4])
    run_engine(engine, ids[:4], [4] * 4)
    rates: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(args.rounds):
        for label in ways if r % 2 == 0 else reversed(ways):
            start = time.perf_counter()
            tokens = ways[label]()
            rates[label].append(tokens / (time.perf_counter() - start))
            print(f"round {r + 1} {label}: {tokens} tokens, {rates[label][-1]:.1f} tokens/s", file=sys.stderr)
    if args.job:
        rates["jobs.batch_infer"] = [run_job(args, prompts, max_tokens)]
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{args.model}: {args.prompts} prompts ({args.loop_prompts} for the plain loop), max_tokens "
          f"{args.min_tokens}..{args.max_tokens} per row (seeded), greedy, {args.batch_size} sequences at once, "
          f"medians of {args.rounds} round(s)\nCPU: {cpu_description()}")
    base = "static" if "static" in med else "engine"
    print(f"{'way':<20}{'gen tokens/s':>14}{'x ' + base:>10}")
    for label, rate in med.items():
        print(f"{label:<20}{rate:>14.1f}{rate / med[base]:>10.2f}")
    if "plain loop" in med:
        print(f"on the same {len(loop_rows)} rows, the engine runs {med['engine, loop rows'] / med['plain loop']:.2f}x "
              "the plain loop")


def run_job(args, prompts: list[str], max_tokens: list[int]) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from jobs import batch_infer

    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(pa.table({"prompt": prompts, "max_tokens": max_tokens}), Path(tmp) / "prompts.parquet")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
        start = time.perf_counter()
        batch_infer.main(model=args.model, input=str(Path(tmp) / "prompts.parquet"), output=str(Path(tmp) / "out"),
                         batch_size=args.batch_size, num_actors=1, cpus_per_actor=1, threads_per_actor=os.cpu_count())
        elapsed = time.perf_counter() - start
        tokens = sum(pq.read_table(Path(tmp) / "out").column("num_generated_tokens").to_pylist())
        ray.shutdown()
    return tokens / elapsed


if __name__ == "__main__":
    main()
