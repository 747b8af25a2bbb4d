"""Speed of raypress's engine against llama.cpp on the same weights, interleaved in one run.

    pip install -e ".[bench]"                 # llama-cpp-python==0.3.36 (built from source), bench only
    python bench/decode_vs_llamacpp.py        # smollm2-135m: int8, int4s-g32, int8-dynamic; 3 rounds
    python bench/decode_vs_llamacpp.py --model random-1b --variants int8 int8-dynamic --prefill 128 1024

Each variant is made by raypress (``specs.apply_`` on the base) and exported by raypress to GGUF (int8 and
int8-dynamic -> Q8_0, int4s-g32 -> Q4_0, int4-g32 -> Q4_1, float32 -> F32), so both engines read the same weights
(up to GGUF's float16 scales). ``random-1b`` is a Llama of TinyLlama-1.1B's shape with random weights and SmolLM2's
vocabulary (``random-3b``: Llama-3.2-3B's shape; ~12 GB in float32 on the way); speed does not depend on the values.

Per round, each variant in turn, llama.cpp (llama-cpp-python's low-level API on the export, --threads threads) and
then raypress's engine (``engine.core``, the path serving and batch jobs use, as many torch threads):
  decode    tokens/s of 1 and of --batch sequences after a --prompt-tokens prompt each, every sequence advancing
            one token per step (llama.cpp: one KV sequence per row, one llama_decode per step); greedy, --tokens
            tokens, ends of sequence ignored on both sides
  prefill   tokens/s of one prompt of each --prefill length, in one call (llama.cpp: one llama_decode of the whole
            prompt; raypress: one engine step)
The memory read bandwidth (a sum over 1 GiB) is measured in the same rounds, and each side's batch-1 decode is
also given as the bytes of matrix weights it reads per second (every linear layer and the output head, once per
token) as a share of it. Prints medians over rounds and raypress / llama.cpp ratios, with the CPU model. SmolLM2's
weights were stored 4-bit (Q4_1) in the file its package ships: its int8 is that model made 8-bit, not an 8-bit
rounding of a float original.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import data, gguf_export, models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from compress.kernels import kernel_isa  # noqa: E402
from compress.qmodules import Int4WeightOnlyLinear  # noqa: E402
from engine import speed  # noqa: E402

# Llama shapes of real models, for random weights: TinyLlama-1.1B and Llama-3.2-3B (with SmolLM2's vocabulary)
RANDOM_SHAPES = {
    "random-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4),
    "random-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                      num_key_value_heads=8, head_dim=128),
}


def base_model(name: str):
    """(float32 model, tokenizer) of a built-in model or of a random Llama of one of RANDOM_SHAPES."""
    if name not in RANDOM_SHAPES:
        model, tokenizer, _ = models.load(name)
        return model, tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _ = models.tokenizer_for("smollm2-135m")
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **RANDOM_SHAPES[name])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer(" ".join(data.BUILTIN_PROMPTS), add_special_tokens=False)["input_ids"]
    return (ids * (n // len(ids) + 1))[:n]


def matrix_bytes(model) -> int:
    """Bytes of the weights a decode step reads once per token: every linear layer (the output head included;
    raypress reads a tied head from the embedding's table), not the embedding lookup; not the offsets of int4 on the
    symmetric grid, which its kernel never reads (kernels.int4_kernel_offset)."""
    total = 0
    for name, mod in model.named_modules():
        if name.endswith(("_proj", "lm_head")):
            symmetric = isinstance(mod, Int4WeightOnlyLinear) and not mod.kernel_offset().numel()
            total += sum(t.numel() * t.element_size() for t in (*mod.parameters(recurse=False),
                                                              *mod.buffers(recurse=False))
                         if not (symmetric and t is mod.offset))
    return total


def gguf_matrix_bytes(path: Path) -> int:
    """The same count for a GGUF file: every tensor but the token embedding (unless it is also the head)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    names = {t.name for t in tensors}
    return sum(int(t.n_bytes) for t in tensors
               if t.name != "token_embd.weight" or "output.weight" not in names
               if not t.name.endswith("norm.weight"))


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API: greedy decode of one or several sequences, prefill."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, batch: int):
        import llama_cpp

        self.lib = llama_cpp
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = llama_cpp.llama_context_default_params()  # one KV sequence per row
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx * batch, n_ctx, n_ctx
        params.n_seq_max, params.kv_unified = batch, True
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, batch)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

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

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def prefill(self, prompt: list[int]) -> float:
        """Prefill tokens/s of one prompt, in one llama_decode."""
        self._clear()
        start = time.perf_counter()
        self._decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        return len(prompt) / (time.perf_counter() - start)

    def decode(self, prompt: list[int], batch: int, tokens: int) -> float:
        """Decode tokens/s of ``batch`` sequences, prompts prefilled first."""
        self._clear()
        last = []
        for s in range(batch):
            last += self._decode([(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        start = time.perf_counter()
        for step in range(tokens):
            pos = len(prompt) + step
            last = self._decode([(last[s], pos, s, True) for s in range(batch)])
        return batch * tokens / (time.perf_counter() - start)


LOAD = """
import re, sys, time
import torch
from transformers import LlamaForCausalLM  # noqa: F401  (imported before the baseline: not the load's memory)
from compress import artifact
def peak():  # VmHWM: this address space's peak resident memory (ru_maxrss would count the parent's, from fork)
    return int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = peak()
start = time.perf_counter()
model = artifact.load(sys.argv[1]).model
seconds = time.perf_counter() - start
with torch.inference_mode():
    model(torch.arange(1, 17)[None])  # every weight read once: the artifact's tensors map its file
print(seconds, peak() - before)
"""


def load_footprint(model, tokenizer, spec: str, folder: Path) -> tuple[int, float, int]:
    """(bytes on disk, seconds, peak memory added) of loading ``model`` saved as an artifact and running one
    16-token forward, in a fresh process (its peak resident memory above what the imports took)."""
    from compress import artifact

    artifact.save(model, tokenizer, folder, {"spec": spec})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return artifact.size_on_disk(folder), float(out[-2]), int(out[-1])


def _quiet(level, text, user_data) -> None:
    pass


_QUIET = None  # llama.cpp's log callback (a ctypes function kept alive here), made once llama_cpp is imported


def read_bandwidth(big: torch.Tensor) -> float:
    start = time.perf_counter()
    big.sum()
    return big.numel() * big.element_size() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a built-in causal model or one of {', '.join(RANDOM_SHAPES)}")
    parser.add_argument("--variants", nargs="+", default=["int8", "int4s-g32", "int8-dynamic"],
                        help="specs GGUF can hold: float32, int8, int8-dynamic, int4s-g32, int4-g32 (and -g64/-g128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per sequence")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="each decoded sequence's prompt")
    parser.add_argument("--prefill", nargs="+", type=int, default=[128, 1024], help="prompt lengths to prefill")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-load", action="store_true",
                        help="skip saving each variant as an artifact and timing its load (time and peak memory)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import llama_cpp

        global _QUIET
        _QUIET = llama_cpp.llama_log_callback(_quiet)
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_QUIET, None)  # llama.cpp logs every load and context to stderr
    except ImportError:
        sys.exit('llama-cpp-python is not installed: pip install -e ".[bench]" (it is a benchmark-only extra)')
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)  # raypress on as many threads as llama.cpp
    base, tokenizer = base_model(args.model)
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    prefill_prompts = {n: prompt_ids(tokenizer, n) for n in args.prefill}
    n_ctx = max(args.prompt_tokens + args.tokens, *args.prefill) + 8
    engines, read_bytes = {}, {}
    workdir = Path(tempfile.mkdtemp(prefix="raypress-vs-llamacpp-"))
    variants = {}
    for v in args.variants:  # one float copy at a time (4.4 GB each at 1.1B)
        variants[v] = base if v == "float32" else copy.deepcopy(base)
        if v != "float32":
            specs.apply_(variants[v], v)
    for v, model in variants.items():
        path = gguf_export.write(model, tokenizer, workdir / f"{v}.gguf", f"{args.model} {v}")
        engines[v] = LlamaCpp(path, args.threads, n_ctx, args.batch)
        read_bytes[v] = {"raypress": matrix_bytes(model), "llama.cpp": gguf_matrix_bytes(path)}
        print(f"{v}: exported to {path.name} ({path.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
    del base  # (the float32 variant, where asked for, holds it)
    loads = {} if args.no_load else {v: load_footprint(m, tokenizer, v, workdir / v) for v, m in variants.items()}
    big = torch.ones(1 << 28)  # 1 GiB
    samples: dict[tuple, list[float]] = {}

    def add(key, value):
        samples.setdefault(key, []).append(value)

    for r in range(args.rounds):
        add(("bandwidth",), read_bandwidth(big))
        for v, model in variants.items():
            cpp = engines[v]
            for b in (1, args.batch):
                add((v, "llama.cpp", f"decode b{b}"), cpp.decode(prompt, b, args.tokens))
                add((v, "raypress", f"decode b{b}"), speed.engine_speed(model, tokenizer, [prompt] * b, args.tokens)[1])
            for n, p in prefill_prompts.items():
                add((v, "llama.cpp", f"prefill {n}"), cpp.prefill(p))
                add((v, "raypress", f"prefill {n}"), speed.engine_speed(model, tokenizer, [p], 1)[0])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    for cpp in engines.values():
        cpp.close()

    med = {k: statistics.median(s) for k, s in samples.items()}
    bandwidth = med[("bandwidth",)]
    columns = ["decode b1", f"decode b{args.batch}", *(f"prefill {n}" for n in args.prefill)]
    print(f"\n{args.model}, raypress's variants and llama.cpp on raypress's GGUF export of each; {args.threads} "
          f"threads; decode: {args.prompt_tokens}-token prompts, {args.tokens} greedy tokens; tokens/s, medians of "
          f"{args.rounds} rounds\nCPU: {cpu_description()}; raypress kernels: {kernel_isa() or 'portable path'}; "
          f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'variant':<14}{'engine':<11}" + "".join(f"{c:>14}" for c in columns) + f"{'b1 bytes/s':>16}")
    for v in variants:
        for side in ("llama.cpp", "raypress"):
            cells = [med[(v, side, c)] for c in columns]
            share = cells[0] * read_bytes[v][side] / bandwidth
            print(f"{v:<14}{side:<11}" + "".join(f"{x:>14.1f}" for x in cells)
                  + f"{f'{share:.0%} of read':>16}")
        ratios = [med[(v, "raypress", c)] / med[(v, "llama.cpp", c)] for c in columns]
        print(f"{'':<14}{'ratio':<11}" + "".join(f"{x:>13.2f}x" for x in ratios))
    for v, (disk, seconds, peak) in loads.items():
        print(f"load of the {v} artifact (fresh process): {seconds:.1f} s; peak memory with a first forward "
              f"+{peak / 1e9:.2f} GB = {peak / disk:.2f}x its {disk / 1e9:.2f} GB on disk")


if __name__ == "__main__":
    main()
