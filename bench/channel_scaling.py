"""Channel scaling against the plain forms, on real text: AWQ against round-to-nearest int4 (and GPTQ) at the same
grid and group, SmoothQuant against int8-dynamic (compress/channel_scaling.py).

    python bench/channel_scaling.py --text ../shared/data/wikitext2-valid.txt
    python bench/channel_scaling.py --text FILE --pairs int4-g128:awq-int4-g128

The text's first half is the evaluation text, its second half the calibration text (both variants of a pair get the
same). Prints perplexity (the float model's in the header) and top-1 agreement with the float model, and the time
each variant took to make. SmolLM2's weights were already 4-bit in the GGUF it ships as (Q4_1, blocks of 32): say so
beside its 4-bit figures. Quality only: a scaled variant runs on the same modules as its plain form.
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

PAIRS = ["int4-g32:awq-int4-g32", "int4-g64:awq-int4-g64", "int4-g128:awq-int4-g128", "int4s-g128:awq-int4s-g128",
         "gptq-int4-g128:awq-gptq-int4-g128", "int8-dynamic:smooth-int8-dynamic"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="a text file (one passage per line, or jsonl/parquet)")
    parser.add_argument("--model", default="smollm2-135m", help="a Llama-family causal LM")
    parser.add_argument("--pairs", nargs="+", default=PAIRS, help="PLAIN:SCALED spec pairs")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    texts = data.read_texts(args.text)
    half = len(texts) // 2
    model, tokenizer, kind = models.load(args.model)
    if kind != models.CAUSAL:
        raise SystemExit(f"{args.model} is an encoder: channel scaling here knows Llama-family causal LMs")
    ref = evaluate.causal_reference(model, tokenizer, data.token_blocks(tokenizer, texts[:half], 256, 8),
                                    greedy_tokens=8)
    calib = data.token_blocks(tokenizer, texts[half:], 256, 16)
    print(f"CPU: {cpu_description()}; {args.model}, float perplexity {ref.ppl:.2f}; eval: {half} passages, "
          f"calibration: {len(texts) - half}")
    print("| plain | perplexity, top-1 | made in | scaled | perplexity, top-1 | made in |")
    print("| --- | --- | --- | --- | --- | --- |")
    for pair in args.pairs:
        cells = []
        for spec in pair.split(":"):
            variant = copy.deepcopy(model)
            start = time.perf_counter()
            specs.apply_(variant, spec, blocks=calib)
            made = time.perf_counter() - start
            q = evaluate.quality(variant, tokenizer, kind, ref)
            cells += [f"`{spec}`", f"{q['ppl']:.2f}, {q['top1_agreement']:.3f}", f"{made:.0f} s"]
            del variant
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
