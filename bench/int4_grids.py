"""Quality of raypress's int4 grids side by side: integer zero points (int4-gN, the default) against each group's
float minimum (int4m-gN, GGUF's Q4_1 grid), round to nearest and GPTQ, on both built-in models.

    python bench/int4_grids.py --text ../shared/data/wikitext2-valid.txt
    python bench/int4_grids.py --text FILE --groups 64 --models minilm-l6

The text's first half is the evaluation text and its second half the calibration text. SmolLM2 reports perplexity
(its float model's in the header) and top-1 agreement with the float model; MiniLM reports the mean cosine of its
sentence embeddings to the float model's. SmolLM2's weights were already 4-bit in the GGUF it ships as (Q4_1 in
blocks of 32, which is the int4m-g32 grid), so on it int4m-g32 re-quantizes almost losslessly; MiniLM had no prior
quantization. Quality only: timing is the same for both grids (the kernels take a float offset either way).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import data, evaluate, models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="a text file (one passage per line, or jsonl/parquet)")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    parser.add_argument("--groups", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--gptq-groups", nargs="+", type=int, default=[64, 128])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    texts = data.read_texts(args.text)
    half = len(texts) // 2
    print(f"CPU: {cpu_description()}; eval: {half} passages, calibration: {len(texts) - half}")
    print("| model | variant | integer zero points (int4) | float minimum (int4m) |")
    print("| --- | --- | --- | --- |")
    for name in args.models:
        model, tokenizer, kind = models.load(name)
        causal = kind == models.CAUSAL
        if causal:
            ref = evaluate.causal_reference(model, tokenizer, data.token_blocks(tokenizer, texts[:half], 256, 8),
                                            greedy_tokens=8)
            calib = data.token_blocks(tokenizer, texts[half:], 256, 16)
            header = f"perplexity (float {ref.ppl:.2f}), top-1 agreement"
        else:
            ref = evaluate.encoder_reference(model, tokenizer, texts[:half])
            calib = data.calibration_blocks(model, tokenizer, kind, texts[half:], n_blocks=32)
            header = "cosine to float"
        print(f"| {name} | {header} | | |")
        variants = [f"int4{{}}-g{g}" for g in args.groups] + [f"gptq-int4{{}}-g{g}" for g in args.gptq_groups]
        for template in variants:
            cells = []
            for letter in ("", "m"):
                spec = template.format(letter)
                v = copy.deepcopy(model)
                specs.apply_(v, spec, blocks=calib)
                q = evaluate.quality(v, tokenizer, kind, ref)
                cells.append(f"{q['ppl']:.2f}, {q['top1_agreement']:.3f}" if causal else f"{q['cosine_to_base']:.4f}")
                del v
            print(f"| {name} | {template.format('')} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
