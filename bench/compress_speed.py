"""Speed of each compressed variant as a ratio to float32, measured in the same run on this machine.

    python bench/compress_speed.py                       # smollm2-135m and minilm-l6, the default variants
    python bench/compress_speed.py --specs int8 int4-g128 --rounds 5

Causal LMs: prefill tokens/s (batch 1, 128 tokens) and decode tokens/s at batch 1 and 8. Encoders: sentences/s at
batch 64. Each round measures every variant once, in turn, so drift on a shared machine hits all of them alike;
the table shows the median over rounds and the ratio to float32. Timing only: quality is jobs.compress's job.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import data, evaluate, kernels, models, specs  # noqa: E402
from engine import speed  # noqa: E402

CAUSAL_SPECS = ["int8", "int8-dynamic", "int4-g128"]
ENCODER_SPECS = ["int8", "int8-dynamic"]


def bench_model(name: str, variant_specs: list[str], rounds: int) -> list[dict]:
    base, tokenizer, kind = models.load(name)
    variants = {"float32": base}
    for spec in variant_specs:
        if specs.needs_calibration(spec):
            print(f"  {spec}: needs calibration; its stored format is timed by the spec it shares (e.g. int4-g128)")
            continue
        variants[spec] = copy.deepcopy(base)
        specs.apply_(variants[spec], spec)
    texts = list(data.BUILTIN_PROMPTS)
    samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    for r in range(rounds):
        for label, model in variants.items():
            if kind == models.CAUSAL:
                m = speed.causal_speed(model, tokenizer, repeats=1, new_tokens=24)
            else:
                m = evaluate.encoder_speed(model, tokenizer, texts, repeats=1)
            for k, v in m.items():
                samples[label].setdefault(k, []).append(v)
        print(f"  {name}: round {r + 1}/{rounds} done", file=sys.stderr)
    rows = []
    for label in variants:
        med = {k: statistics.median(v) for k, v in samples[label].items()}
        ratio = {k: med[k] / statistics.median(samples["float32"][k]) for k in med}
        rows.append({"model": name, "variant": label, "median": med, "ratio": ratio,
                     "memory_mb": evaluate.memory_bytes(variants[label]) / 1e6})
    return rows


def print_table(rows: list[dict]) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        keys = list(sub[0]["median"])
        print(f"\n{model}   (median of rounds; x = ratio to float32 in this run)")
        print(f"{'variant':<16}{'memory MB':>11}" + "".join(f"{k:>30}" for k in keys))
        for r in sub:
            cells = "".join(f"{r['median'][k]:>20.1f} ({r['ratio'][k]:>4.2f}x)" for k in keys)
            print(f"{r['variant']:<16}{r['memory_mb']:>11.1f}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    parser.add_argument("--specs", nargs="+", default=None, help="variants (default: per model kind)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, raypress kernels: {kernels.kernels_available()}")
    start = time.perf_counter()
    rows = []
    for name in args.models:
        kind = models.BUILTINS[name].kind if name in models.BUILTINS else None
        default = CAUSAL_SPECS if kind == models.CAUSAL else ENCODER_SPECS
        rows += bench_model(name, args.specs or default, args.rounds)
    print_table(rows)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
