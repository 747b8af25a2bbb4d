"""A variant's speed as serving and batch jobs see it: prefill and decode through the engine; encoders' sentences/s.

    measure(model, tokenizer, kind)  # {"prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8"}
    engine_speed(model, tokenizer, prompts, new_tokens)   # (prefill tokens/s, decode tokens/s) of one run
    vllm_speed(folder)               # the same figures with vLLM generating (engine.vllm), for GPU deployments

Medians of ``repeats`` runs after a warm-up, on random prompts (the same ones for every variant of a model, on
either engine).
"""

from __future__ import annotations

import statistics

import torch

from compress.data import BUILTIN_PROMPTS
from compress.evaluate import clock, encoder_speed
from compress.hf import CAUSAL
from engine.core import Engine
from engine.sampling import SamplingParams


def measure(model, tokenizer, kind: str, repeats: int = 3) -> dict:
    """The engine's speed for a causal LM, sentences per second for an encoder."""
    if kind == CAUSAL:
        return causal_speed(model, tokenizer, repeats=repeats)
    return encoder_speed(model, tokenizer, list(BUILTIN_PROMPTS), repeats=repeats)


@torch.inference_mode()
def causal_speed(
    model, tokenizer, *, prompt_tokens: int = 128, new_tokens: int = 32, batch_sizes=(1, 8), repeats: int = 3
) -> dict:
    """Prefill tokens/s (one prompt) and decode tokens/s at each batch size, through the engine (the path serving
    and batch jobs run): medians of ``repeats`` runs after a warm-up, on random prompts."""
    prompts = random_prompts(model.config.vocab_size, max(batch_sizes), prompt_tokens)
    return _medians(lambda b: engine_speed(model, tokenizer, prompts[:b], new_tokens), batch_sizes, repeats)


def vllm_speed(folder, *, settings: dict | None = None, prompt_tokens: int = 128, new_tokens: int = 32,
               batch_sizes=(1, 8), repeats: int = 3) -> dict:
    """``causal_speed``'s figures with vLLM generating ``folder`` (a model folder or compressed-tensors export;
    ``settings``: engine.vllm's, e.g. its CPU backend's dtype), prefix caching off so that every run prefills. vLLM
    runs a request to its end in one call: prefill is timed as a one-token generation, decode as the rest of a full
    one (ends of sequence ignored, so every sequence makes ``new_tokens``)."""
    import time

    from engine.vllm import VllmEngine

    engine = VllmEngine(folder, max_num_seqs=max(batch_sizes), max_model_len=prompt_tokens + new_tokens,
                        enable_prefix_caching=False, **(settings or {}))
    prompts = random_prompts(engine.vocab_size, max(batch_sizes), prompt_tokens)

    def run(b: int) -> tuple[float, float]:
        timed = []
        for n in (1, new_tokens):
            start = time.perf_counter()
            engine.generate(prompts[:b], [SamplingParams(max_tokens=n, ignore_eos=True)] * b)
            timed.append(time.perf_counter() - start)
        return b * prompt_tokens / timed[0], b * (new_tokens - 1) / max(timed[1] - timed[0], 1e-9)

    try:
        return _medians(run, batch_sizes, repeats)
    finally:
        engine.shutdown()


def random_prompts(vocab_size: int, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids, the same for every variant of a model (seeded)."""
    rng = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab_size, 30000), (n, length), generator=rng).tolist()


def _medians(run, batch_sizes, repeats: int) -> dict:
    """The figures' medians over ``repeats`` runs of ``run(batch size) -> (prefill tokens/s, decode tokens/s)``,
    after a warm-up run at each batch size; prefill at the first batch size only."""
    result = {}
    for b in batch_sizes:
        runs = [run(b) for _ in range(repeats + 1)][1:]
        if b == batch_sizes[0]:
            result["prefill_tokens_per_s"] = statistics.median(r[0] for r in runs)
        result[f"decode_tokens_per_s_b{b}"] = statistics.median(r[1] for r in runs)
    return result


@torch.inference_mode()
def engine_speed(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of ``prompts`` run together on a fresh engine: all prompts in one step,
    then decode steps until every sequence has ``new_tokens`` tokens."""
    longest = max(len(p) for p in prompts)
    engine = Engine(model, tokenizer, max_num_seqs=len(prompts), max_model_len=longest + new_tokens,
                    max_batch_tokens=max(512, sum(map(len, prompts)) + len(prompts)))
    # every sequence makes new_tokens (a model's end token would shrink the batch it is timed at)
    handles = [engine.submit(p, SamplingParams(max_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    start = clock(model)
    engine.step()  # takes the requests in; with room for every prompt, this one step prefills them all
    while engine.scheduler.num_prefilling:
        engine.step()
    prefill_s, made = clock(model) - start, engine.metrics.generation_tokens
    start = clock(model)
    while not all(h.done for h in handles):
        engine.step()
    decode_s = clock(model) - start
    decoded = engine.metrics.generation_tokens - made
    return sum(map(len, prompts)) / prefill_s, decoded / max(decode_s, 1e-9)
