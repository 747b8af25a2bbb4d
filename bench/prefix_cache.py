"""The prefix cache and the paged KV cache, measured against the same engine without them, in one run.

    python bench/prefix_cache.py                       # SmolLM2 float32 and int8, every workload, 2 rounds
    python bench/prefix_cache.py --variants float32 --workloads chat none --rounds 1

Workloads, each run with prefix caching on and off on the same engine settings, alternating round by round:
  chat    --clients concurrent conversations sharing one ~800-token system prompt (real text), each of --turns short
          user turns; every turn sends the whole conversation again (system prompt, earlier turns and answers), as
          chat clients do. Time to first token (p50, p95, and p50 of each turn), output tokens/s over the whole
          load, and the share of prompt tokens served from the cache.
  batch   rows that share a ~600-token few-shot prefix and end in a question of their own, generated as a batch
          job's model actor does (calls of 8 x --batch-size rows to one engine). rows/s; caching off runs on
          --off-rows of the rows (it is ~10x slower), on all --rows of them.
  none    --off-rows requests of ~170 tokens with no prefix in common: what the cache costs when it cannot help.
  memory  a mixed load (prompts 20..500 tokens, max_tokens 16..256) on the KV memory of 16 slots of 2048 tokens:
          max_num_seqs=16 (what fixed slots of max_model_len allowed) against 64 on the same paged memory.
          Peak concurrent sequences, preemptions and generated tokens/s.
Greedy decoding throughout; every way warmed up first. Prints medians over rounds and the ratios, with the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import data, models, specs  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from engine.core import Engine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402


def source_text(path: Path) -> str:
    return " ".join(data.read_texts(path)) if path.exists() else " ".join(data.BUILTIN_PROMPTS * 40)


def cut(tokenizer, text: str, start: int, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[start : start + n])


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return data.prompt_ids(tokenizer, data.chat_text(tokenizer, messages), templated=True)


# -- chat -----------------------------------------------------------------------------------------------------------


async def _conversation(engine, tokenizer, system: str, questions: list[str], max_tokens: int, out: dict) -> None:
    messages = [{"role": "system", "content": system}]
    for turn, q in enumerate(questions):
        messages.append({"role": "user", "content": q})
        ids = chat_ids(tokenizer, messages)
        start, first, text = time.perf_counter(), None, ""
        async for event in engine.stream(ids, SamplingParams(max_tokens=max_tokens)):
            if first is None and (event.token_ids or event.finished):
                first = time.perf_counter() - start
            text += event.text
        out["ttft"].append(first)
        out["by_turn"].setdefault(turn, []).append(first)
        out["prompt_tokens"] += len(ids)
        out["cached_tokens"] += event.num_cached_tokens
        out["tokens"] += event.num_generated_tokens
        messages.append({"role": "assistant", "content": text})


def chat(engine, tokenizer, text: str, clients: int, turns: int, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    system = "You answer questions about this text.\n" + cut(tokenizer, text, 0, 800)
    words = text.split()
    convs = [[f"What does the text say about {' '.join(rng.sample(words, 3))}?" for _ in range(turns)]
             for _ in range(clients)]
    out = {"ttft": [], "by_turn": {}, "tokens": 0, "prompt_tokens": 0, "cached_tokens": 0}

    async def run():
        await asyncio.gather(*(_conversation(engine, tokenizer, system, c, max_tokens, out) for c in convs))

    start = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - start
    ttft = sorted(out["ttft"])
    return {"ttft_p50": ttft[len(ttft) // 2], "ttft_p95": ttft[int(0.95 * (len(ttft) - 1))],
            "tokens_per_s": out["tokens"] / seconds, "seconds": seconds,
            "cached_share": out["cached_tokens"] / out["prompt_tokens"],
            **{f"ttft_p50_turn{t + 1}": statistics.median(v) for t, v in sorted(out["by_turn"].items())}}


# -- batch and none -------------------------------------------------------------------------------------------------


def rows(tokenizer, text: str, n: int, prefix_tokens: int, seed: int) -> list[list[int]]:
    """n prompts: a shared few-shot prefix of about prefix_tokens (none when 0), then a question of the row's own."""
    rng = random.Random(seed)
    words = text.split()
    prefix = ""
    if prefix_tokens:
        shots = cut(tokenizer, text, 1000, prefix_tokens)
        prefix = f"Read these notes, then answer in one short sentence.\n{shots}\n"
    out = []
    for _ in range(n):
        own = "" if prefix_tokens else cut(tokenizer, text, rng.randrange(0, 5000), 150)  # no two rows agree
        question = f"Q: what is {' '.join(rng.sample(words, 4))}?\nA:"
        out.append(tokenizer(prefix + own + question, add_special_tokens=False)["input_ids"])
    return out


def batch(engine, prompts: list[list[int]], max_tokens: int, call_rows: int) -> dict:
    start = time.perf_counter()
    produced = 0
    for k in range(0, len(prompts), call_rows):
        part = prompts[k : k + call_rows]
        produced += sum(len(g.token_ids) for g in engine.generate(part, [SamplingParams(max_tokens=max_tokens)]
                                                                  * len(part)))
    seconds = time.perf_counter() - start
    return {"rows_per_s": len(prompts) / seconds, "tokens_per_s": produced / seconds, "seconds": seconds}


# -- memory ---------------------------------------------------------------------------------------------------------


def memory(engine, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    handles = [engine.submit(p, SamplingParams(max_tokens=m)) for p, m in zip(prompts, max_tokens, strict=True)]
    peak, start = 0, time.perf_counter()
    with torch.inference_mode():
        while not all(h.done for h in handles):
            engine.step()
            peak = max(peak, engine.scheduler.num_running)
    seconds = time.perf_counter() - start
    produced = sum(len(h.result().token_ids) for h in handles)
    return {"peak_running": peak, "preemptions": engine.stats().cache.preemptions,
            "tokens_per_s": produced / seconds, "seconds": seconds}


# -- the run --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", nargs="+", default=["float32", "int8"])
    parser.add_argument("--workloads", nargs="+", default=["chat", "batch", "none", "memory"],
                        choices=["chat", "batch", "none", "memory"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--off-rows", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-requests", type=int, default=128)
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext2-valid.txt"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base, tokenizer, _ = models.load(args.model)
    text = source_text(Path(args.text))
    results: dict[tuple, list[dict]] = {}
    for variant in args.variants:
        model = base if variant == "float32" else copy.deepcopy(base)
        if variant != "float32":
            specs.apply_(model, variant)  # in place
        for r in range(args.rounds):
            for work in args.workloads:
                for setting in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    res = run(work, setting, model, tokenizer, text, args, seed=r)
                    results.setdefault((variant, work, setting), []).append(res)
                    print(f"round {r + 1} {variant} {work} {setting}: {res}", file=sys.stderr, flush=True)
    report(results, args)


def engine_for(work: str, setting: str, model, tokenizer, args) -> Engine:
    caching = setting == "on"
    if work == "memory":  # the KV memory of 16 slots x 2048: fixed slots ran 16 at once, paged blocks run 64
        seqs = 16 if setting == "off" else 64
        return Engine(model, tokenizer, max_num_seqs=seqs, max_model_len=2048, kv_cache_tokens=16 * 2048)
    seqs = args.clients if work == "chat" else args.batch_size
    return Engine(model, tokenizer, max_num_seqs=seqs, max_model_len=2048, prefix_caching=caching)


def run(work: str, setting: str, model, tokenizer, text: str, args, seed: int) -> dict:
    engine = engine_for(work, setting, model, tokenizer, args)
    warm = rows(tokenizer, text, 2, 0, seed=99)  # nothing in common with the measured prompts
    engine.generate(warm, [SamplingParams(max_tokens=4)] * 2)
    if work == "chat":
        engine.start()
        try:
            return chat(engine, tokenizer, text, args.clients, args.turns, 32, seed)
        finally:
            engine.shutdown()
    if work == "memory":
        rng = random.Random(seed)
        prompts = [tokenizer(cut(tokenizer, text, rng.randrange(0, 5000), rng.randint(20, 500)),
                             add_special_tokens=False)["input_ids"] for _ in range(args.memory_requests)]
        return memory(engine, prompts, [rng.randint(16, 256) for _ in prompts])
    n = args.rows if work == "batch" and setting == "on" else args.off_rows
    return batch(engine, rows(tokenizer, text, n, 600 if work == "batch" else 0, seed), 16, 8 * args.batch_size)


def report(results: dict, args) -> None:
    print(f"\n{args.model}, {args.rounds} round(s), medians; CPU: {cpu_description()}")
    med = {k: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for k, runs in results.items()}
    for variant in args.variants:
        for work in args.workloads:
            on, off = med[(variant, work, "on")], med[(variant, work, "off")]
            if work == "chat":
                print(f"{variant:<8} chat ({args.clients} clients x {args.turns} turns): TTFT p50 "
                      f"{off['ttft_p50']:.2f} -> {on['ttft_p50']:.2f} s "
                      f"({off['ttft_p50'] / on['ttft_p50']:.1f}x lower), p95 "
                      f"{off['ttft_p95']:.2f} -> {on['ttft_p95']:.2f} s; output tokens/s {off['tokens_per_s']:.1f} "
                      f"-> {on['tokens_per_s']:.1f} ({on['tokens_per_s'] / off['tokens_per_s']:.2f}x); prompt tokens "
                      f"from the cache {on['cached_share']:.0%}; TTFT p50 by turn " + ", ".join(
                          f"{off[k]:.2f} -> {on[k]:.2f} s" for k in on if k.startswith("ttft_p50_turn")))
            elif work == "memory":
                print(f"{variant:<8} memory (16 x 2048 positions): max_num_seqs 16 ran {off['peak_running']:.0f} at "
                      f"once, {off['tokens_per_s']:.1f} tokens/s; 64 ran {on['peak_running']:.0f} at once "
                      f"({on['peak_running'] / off['peak_running']:.1f}x), {on['preemptions']:.0f} preemptions, "
                      f"{on['tokens_per_s']:.1f} tokens/s ({on['tokens_per_s'] / off['tokens_per_s']:.2f}x)")
            else:
                label = "batch, 600-token shared prefix" if work == "batch" else "no shared prefix"
                print(f"{variant:<8} {label}: rows/s off {off['rows_per_s']:.2f}, on {on['rows_per_s']:.2f} "
                      f"({on['rows_per_s'] / off['rows_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
