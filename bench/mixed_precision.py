"""Mixed precision against one format for every layer, at the same bytes: the frontier of ``mixed-Nbit``
(compress/mixed.py) on real text, with the KL each mix was predicted to cost beside the KL it measured.

    python bench/mixed_precision.py --text ../shared/data/wikitext2-valid.txt
    python bench/mixed_precision.py --model minilm-l6 --text FILE --bits 5 6
    python bench/mixed_precision.py                      # the demo's text: written by the model itself
    python bench/mixed_precision.py --bits --uniform int8-dynamic smooth-int8-dynamic int8-dynamic-90

The text's first half is the evaluation text and its second half the calibration text (without --text: the text the
base model writes itself, as ``jobs.compress`` uses). The sensitivity is measured once, for every bits limit.
Causal models: perplexity, KL to the float model (measured, and predicted by the sensitivity), top-1 agreement;
encoders: cosine to the float embeddings and nearest-neighbour overlap. Bytes are the artifact's weights as a
fraction of float32's. SmolLM2's weights were already 4-bit in the GGUF it ships as (Q4_1 in blocks of 32, so
``int4m-g32`` holds them exactly): say so beside its figures.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import data, evaluate, models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from engine import speed  # noqa: E402

UNIFORM = {models.CAUSAL: ["int8", "int4m-g32", "int4-g32", "int4-g64"], models.ENCODER: ["int8", "int4-g32",
                                                                                          "int4-g64"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, folder or artifact")
    parser.add_argument("--text", help="a text file (one passage per line, or jsonl/parquet); default: model-written")
    parser.add_argument("--bits", nargs="*", type=float, default=[5.0, 5.5, 6.0, 6.3, 6.35, 6.4, 7.0],
                        help="the mixes' limits, bits a weight")
    parser.add_argument("--uniform", nargs="*", help="one-format specs measured beside them (default: by kind)")
    parser.add_argument("--speed", action="store_true", help="causal models: prefill (one 128-token prompt) and "
                        "decode tokens/s through the engine, as ratios to the float model's measured in this run")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer, kind = models.load(args.model)
    if args.text:
        texts = data.read_texts(args.text)
        eval_texts, calib_texts = texts[: len(texts) // 2], texts[len(texts) // 2 :]
    else:
        eval_texts = evaluate.default_eval_texts(model, tokenizer, kind)
        calib_texts = None
    ref = evaluate.reference(model, tokenizer, kind, eval_texts, 256, 8)
    blocks = data.calibration_blocks(model, tokenizer, kind, calib_texts)
    base_bytes = evaluate.quality(model, tokenizer, kind, ref)["memory_bytes"]
    causal = kind == models.CAUSAL
    timed = args.speed and causal
    base_speed = _speed(model, tokenizer) if timed else None
    print(f"CPU: {cpu_description()}; {args.model}; eval: {'model-written text' if not args.text else args.text}, "
          f"calibration: {tuple(blocks.shape)} token blocks" + (f"; float perplexity {ref.ppl:.3f}" if causal else ""))
    head = (["perplexity", "KL measured", "KL predicted", "top-1"] if causal
            else ["cosine", "cosine min", "neighbours"]) + (["prefill x float32", "decode x float32"] if timed else [])
    if timed:
        print(f"float32: prefill {base_speed[0]:.0f} tokens/s, decode {base_speed[1]:.1f} tokens/s (batch 1)")
    print("| variant | bytes x float32 | " + " | ".join(head) + " | formats |")
    print("|" + " --- |" * (len(head) + 3))
    shown = False
    for spec in [f"mixed-{b:g}bit" for b in args.bits] + (UNIFORM[kind] if args.uniform is None else args.uniform):
        variant = copy.deepcopy(model)
        start = time.perf_counter()
        try:
            notes = specs.apply_(variant, spec, blocks=blocks).get(spec, {})
        except ValueError as e:
            print(f"| `{spec}` | {e} |")
            continue
        made = time.perf_counter() - start
        q = evaluate.quality(variant, tokenizer, kind, ref)
        predicted = f"{notes['predicted_kl']:.4f}" if "predicted_kl" in notes else ""
        cells = ([f"{q['ppl']:.3f}", f"{q['kl_to_base']:.4f}", predicted, f"{q['top1_agreement']:.3f}"] if causal
                 else [f"{q['cosine_to_base']:.4f}", f"{q['cosine_min']:.4f}", f"{q['neighbour_overlap']:.3f}"])
        if timed:
            cells += [f"{r / b:.2f}" for r, b in zip(_speed(variant, tokenizer), base_speed, strict=True)]
        formats = ", ".join(f"{f} x{n}" for f, n in notes.get("formats", {}).items())
        print(f"| `{spec}` | {q['memory_bytes'] / base_bytes:.4f} | " + " | ".join(cells) + f" | {formats} |",
              flush=True)
        if "sensitivity_seconds" in notes and not shown:
            shown = True
            print(f"  (sensitivity: {notes['sensitivity_tokens']} tokens, {notes['sensitivity_seconds']:.0f} s; "
                  f"this mix made in {made:.0f} s)", flush=True)
        del variant


def _speed(model, tokenizer) -> tuple[float, float]:
    """(prefill, decode) tokens/s at batch 1: medians of 5 runs after a warm-up."""
    s = speed.causal_speed(model, tokenizer, batch_sizes=(1,), repeats=5)
    return s["prefill_tokens_per_s"], s["decode_tokens_per_s_b1"]


if __name__ == "__main__":
    main()
