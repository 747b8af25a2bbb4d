"""Is the lean decode step faster under torch.compile? Eager against compiled, at fixed slot counts, in one run.

    python bench/lean_compile.py                          # int8, 1 and 8 running sequences, inductor's defaults
    python bench/lean_compile.py --variants float32 int8 --cpp-wrapper

The engine runs the lean forward eagerly: this script is how that choice was made, and how to re-make it on other
hardware. For each variant it fills the cache with --batch sequences of a --prompt-tokens prompt, then times one
decode step (``LeanForward.__call__`` on one token per sequence, the engine's bookkeeping left out) eagerly and
compiled with ``torch.compile(fullgraph=True, dynamic=False)`` (one graph per slot count: the shapes are static),
alternating the two, and prints medians with their ratio. The compiled step is checked against the eager one first.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from engine.core import Engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def decode_step(model, tokenizer, batch: int, prompt_tokens: int):
    """A function running one decode step of ``batch`` sequences on the lean forward, with its inputs fixed."""
    engine = Engine(model, tokenizer, max_num_seqs=batch, max_model_len=prompt_tokens + 64,
                    max_batch_tokens=max(512, batch * prompt_tokens))
    if engine.runner.name != "lean":
        sys.exit("this model does not run on the lean forward")
    prompt = list(range(1000, 1000 + prompt_tokens))
    for _ in range(batch):
        engine.submit(prompt, SamplingParams(max_tokens=32))
    running = engine.scheduler.running
    while len(running) < batch or any(s.num_tokens - s.computed != 1 for s in running):
        engine.step()
    layout = engine.cache.plan([(s.block_table, s.computed + 1) for s in running], [])
    tokens = torch.tensor([s.tokens[-1] for s in running])
    return engine.runner, (tokens, layout, engine.cache)


def ms_per_call(fn, args, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", nargs="+", default=["int8"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50, help="decode steps per timing")
    parser.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper (much longer compile)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_grad_enabled(False)
    if args.cpp_wrapper:
        from torch._inductor import config as inductor_config

        inductor_config.cpp_wrapper = True
    base, tokenizer, _ = models.load(args.model)
    rows = []
    for variant in args.variants:
        model = base if variant == "float32" else copy.deepcopy(base)
        if variant != "float32":
            specs.apply_(model, variant)
        for batch in args.batches:
            lean, inputs = decode_step(model, tokenizer, batch, args.prompt_tokens)
            with torch.inference_mode():
                torch._dynamo.reset()
                start = time.perf_counter()
                compiled = torch.compile(lean.__call__, fullgraph=True, dynamic=False)
                diff = (compiled(*inputs) - lean(*inputs)).abs().max().item()
                compile_s = time.perf_counter() - start
                eager, comp = [], []
                for _ in range(args.rounds):
                    eager.append(ms_per_call(lean, inputs, args.calls))
                    comp.append(ms_per_call(compiled, inputs, args.calls))
            e, c = statistics.median(eager), statistics.median(comp)
            rows.append((variant, batch, e, c, compile_s, diff))
            print(f"{variant} batch {batch}: eager {e:.2f} ms, compiled {c:.2f} ms", file=sys.stderr)
    print(f"\n{args.model}, one decode step after a {args.prompt_tokens}-token prompt, medians of {args.rounds} rounds "
          f"of {args.calls} steps, {torch.get_num_threads()} threads, wrapper: "
          f"{'C++' if args.cpp_wrapper else 'Python'}\nCPU: {cpu_description()}")
    print(f"{'variant':<14}{'slots':>6}{'eager ms':>10}{'compiled ms':>13}{'eager/compiled':>16}{'compile s':>11}"
          f"{'max |diff|':>12}")
    for variant, batch, e, c, compile_s, diff in rows:
        print(f"{variant:<14}{batch:>6}{e:>10.2f}{c:>13.2f}{e / c:>16.2f}{compile_s:>11.1f}{diff:>12.2e}")


if __name__ == "__main__":
    main()
