"""Compress one model with one spec, measure it against the base, and save it as an artifact.

    python -m jobs.compress --model smollm2-135m --spec int8 --out artifacts/smollm2-int8
    python -m jobs.compress --model minilm-l6 --spec int8-dynamic --out artifacts/minilm-int8dyn --eval-data notes.txt
    ray job submit --working-dir . -- python -m jobs.compress --model smollm2-135m --spec int4-g128 --out /tmp/a

Prints a one-screen table (base vs variant, every metric, with ratios); the metrics go into raypress.json too.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path

from compress import artifact, data, evaluate, models, specs
from engine.speed import measure as measure_speed

log = logging.getLogger("jobs.compress")


def measure(model, tokenizer, kind: str, reference, speed: bool) -> dict:
    metrics = evaluate.quality(model, tokenizer, kind, reference)
    if speed:
        metrics.update(measure_speed(model, tokenizer, kind))
    return metrics


def format_table(base: dict, variant: dict, spec: str) -> str:
    keys = [k for k in variant if isinstance(variant[k], int | float)]
    lines = [f"{'metric':<26}{'base':>14}{spec:>20}{'ratio':>10}", "-" * 70]
    for k in keys:
        b, v = base.get(k), variant[k]
        ratio = f"{v / b:.3f}" if isinstance(b, int | float) and b else ""
        lines.append(f"{k:<26}{_fmt(b):>14}{_fmt(v):>20}{ratio:>10}")
    return "\n".join(lines)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or (isinstance(x, float) and x >= 1e5):
        return f"{x:,.0f}"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def main(
    model: str = models.DEFAULT_MODEL,
    spec: str = "int8",
    out: str = "artifacts/compressed",
    eval_data: str | None = None,
    eval_column: str = "text",
    calib_data: str | None = None,
    seq_len: int = 256,
    eval_blocks: int = 8,
    speed: bool = True,
) -> int:
    """Compress one model with one spec, evaluate it against the base and save the artifact.

    Args:
        model: built-in name, model folder, raypress artifact, or hub id.
        spec: variant to make, e.g. int8, int8-dynamic, int4-g128, gptq-int4-g128, prune-2:4+int8, mixed-6bit (a
            format per layer, at most 6 bits a weight on average), smooth-int8-dynamic-90 (int8 activations in the
            layers doing 90% of the multiply-adds, float ones where rounding them costs most).
        out: artifact folder to write (replaced if it exists, only once the new one is complete).
        eval_data: text file (.txt paragraphs, .jsonl, .parquet, .csv) for evaluation and calibration;
            default: text the base model writes itself from built-in prompts.
        eval_column: column holding the text in a .jsonl / .parquet / .csv file (eval and calibration).
        calib_data: text file for the methods that calibrate on activations (gptq, awq, smooth, wanda,
            distill, mixed); default: text the base model writes itself from built-in prompts (a different sample
            from the evaluation text).
        seq_len: tokens per evaluation block (causal models).
        eval_blocks: number of evaluation blocks (causal models).
        speed: measure speed (prefill/decode tokens/s, or sentences/s) as well as quality.
    """
    parsed = specs.parse(spec)  # fail on a bad spec before loading anything
    start = time.perf_counter()
    base, tokenizer, kind = models.load(model)
    log.info("loaded %s (%s) in %.1f s", model, kind, time.perf_counter() - start)
    if eval_data:
        texts = data.read_texts(eval_data, column=eval_column)
    else:
        log.info("no --eval-data: evaluating on text the base model writes itself from built-in prompts")
        texts = evaluate.default_eval_texts(base, tokenizer, kind)
    reference = evaluate.reference(base, tokenizer, kind, texts, seq_len, eval_blocks)
    base_metrics = measure(base, tokenizer, kind, reference, speed)
    base_metrics["artifact_bytes"] = base_metrics["memory_bytes"]  # float tensors as a safetensors file holds them

    blocks = None
    if specs.needs_calibration(parsed):
        calib = data.read_texts(calib_data, column=eval_column) if calib_data else None
        blocks = data.calibration_blocks(base, tokenizer, kind, calib)
    t0 = time.perf_counter()
    variant = copy.deepcopy(base)
    notes = specs.apply_(variant, parsed, blocks=blocks)
    compress_s = time.perf_counter() - t0
    metrics = measure(variant, tokenizer, kind, reference, speed)
    manifest = {
        "spec": str(parsed),
        "base_model": {"id": model, "weight_digest": artifact.weight_digest(base)},
        "metrics": metrics,
        "base_metrics": base_metrics,
        "compress_seconds": compress_s,
        "notes": notes,
    }
    path = artifact.save(variant, tokenizer, out, manifest)
    metrics["artifact_bytes"] = artifact.weights_bytes(path)
    artifact.update_metrics(path, metrics)

    print(f"\n{model} -> {parsed}  ({kind}; compressed in {compress_s:.1f} s)")
    if model == "smollm2-135m":
        print("note: smollm2-135m ships as a 4-bit GGUF (Q4_1); 'base' is that checkpoint dequantized to float32.")
    print(format_table(base_metrics, metrics, str(parsed)))
    print(f"\nartifact: {Path(path).resolve()}  ({artifact.size_on_disk(path):,} bytes on disk)")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles functions and classes by module name.
    from jobs import compress as job
    from jobs.cli import run

    sys.exit(run(job.main))
