"""Measure a variant against its base: quality, size, speed.

    ref = causal_reference(base, tokenizer, blocks)        # base log-probs, computed once per sweep
    quality = causal_quality(variant, ref)                 # ppl, kl_to_base, top1_agreement, greedy_agreement
    speed = encoder_speed(variant, tokenizer, texts)       # sentences per second

Quality numbers compare the variant with the base on the same tokens; speed numbers are medians after warm-up. A
causal LM's speed is the engine's (engine.speed), since that is the path serving and batch jobs run.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress import data
from compress.data import BUILTIN_PROMPTS, chat_prompt
from compress.encoders import encode
from compress.hf import CAUSAL

GREEDY_PROMPTS = BUILTIN_PROMPTS[:8]


@dataclass
class CausalReference:
    blocks: torch.Tensor  # [n, T] token ids
    logprobs: list[torch.Tensor]  # per block [T-1, V] base log-probs of the next token
    greedy: list[list[int]]  # base greedy continuation of each GREEDY_PROMPT
    greedy_tokens: int
    ppl: float


@torch.inference_mode()
def causal_reference(model, tokenizer, blocks: torch.Tensor, greedy_tokens: int = 32) -> CausalReference:
    logprobs, nll = [], []
    for block in blocks:
        lp = _next_token_logprobs(model, block)
        logprobs.append(lp)
        nll.append(-lp.gather(-1, block[1:, None]).mean().item())
    greedy = [_greedy(model, tokenizer, p, greedy_tokens) for p in GREEDY_PROMPTS]
    return CausalReference(blocks, logprobs, greedy, greedy_tokens, math.exp(statistics.fmean(nll)))


@torch.inference_mode()
def causal_quality(model, tokenizer, ref: CausalReference) -> dict:
    """Perplexity, mean KL(base || variant) per token, top-1 next-token agreement, greedy-continuation agreement."""
    nll, kl, agree = [], [], []
    for block, base_lp in zip(ref.blocks, ref.logprobs, strict=True):
        lp = _next_token_logprobs(model, block)
        nll.append(-lp.gather(-1, block[1:, None]).mean().item())
        kl.append(F.kl_div(lp, base_lp, log_target=True, reduction="none").sum(-1).mean().item())
        agree.append((lp.argmax(-1) == base_lp.argmax(-1)).float().mean().item())
    greedy = []
    for prompt, base_ids in zip(GREEDY_PROMPTS, ref.greedy, strict=True):
        ids = _greedy(model, tokenizer, prompt, ref.greedy_tokens)
        n = max(len(base_ids), 1)
        greedy.append(sum(a == b for a, b in zip(ids, base_ids, strict=False)) / n)
    return {
        "ppl": math.exp(statistics.fmean(nll)),
        "kl_to_base": statistics.fmean(kl),
        "top1_agreement": statistics.fmean(agree),
        "greedy_agreement": statistics.fmean(greedy),
    }


def _next_token_logprobs(model, block: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(block[None].to(device)).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    enc = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    enc = enc.to(next(model.parameters()).device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1] :].tolist()


@dataclass
class EncoderReference:
    texts: list[str]
    embeddings: torch.Tensor  # [n, D]


@torch.inference_mode()
def encoder_reference(model, tokenizer, texts: list[str]) -> EncoderReference:
    return EncoderReference(texts, encode(model, tokenizer, texts))


@torch.inference_mode()
def encoder_quality(model, tokenizer, ref: EncoderReference, k: int = 10) -> dict:
    """Mean cosine similarity to the base embeddings and overlap of each text's top-k neighbours."""
    emb = encode(model, tokenizer, ref.texts)
    cosine = F.cosine_similarity(emb.float(), ref.embeddings.float(), dim=-1)
    k = min(k, len(ref.texts) - 1)
    overlap = float("nan")
    if k > 0:
        nb_base, nb_var = _neighbours(ref.embeddings, k), _neighbours(emb, k)
        pairs = zip(nb_base.tolist(), nb_var.tolist(), strict=True)
        overlap = statistics.fmean(len(set(a) & set(b)) / k for a, b in pairs)
    return {"cosine_to_base": cosine.mean().item(), "cosine_min": cosine.min().item(), "neighbour_overlap": overlap}


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    e = F.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=-1).indices


# ---------------------------------------------------------------------------------------------------------------
# Size


def memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (each shared tensor once), plus kernel-packed copies of weights."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total + sum(getattr(m, "packed_bytes", 0) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# Speed


def clock(model) -> float:
    """The time once the model's device has finished what was queued (CUDA runs asynchronously)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median_time(model, fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock(model)
        fn()
        times.append(clock(model) - start)
    return statistics.median(times)


@torch.inference_mode()
def encoder_speed(model, tokenizer, texts: list[str], *, batch_size: int = 64, repeats: int = 3) -> dict:
    batch = (texts * (batch_size // max(len(texts), 1) + 1))[:batch_size]
    t = _median_time(model, lambda: encode(model, tokenizer, batch, batch_size=batch_size), repeats)
    return {"sentences_per_s": batch_size / t}


# ---------------------------------------------------------------------------------------------------------------
# By kind


def default_eval_texts(model, tokenizer, kind: str) -> list[str]:
    """Evaluation text that needs no download: the causal model's own writing (a sample other than calibration's),
    or the built-in prompts for encoders."""
    if kind == CAUSAL:
        return data.generated_texts(model, tokenizer, n=16, max_new_tokens=160, seed=1)
    return list(BUILTIN_PROMPTS)


def reference(model, tokenizer, kind: str, texts: list[str], seq_len: int = 256, n_blocks: int = 8):
    """What a variant is compared against: base log-probs on token blocks, or base embeddings of sentences."""
    if kind == CAUSAL:
        return causal_reference(model, tokenizer, data.token_blocks(tokenizer, texts, seq_len, n_blocks))
    sentences = [s.strip() for t in texts for s in t.replace("\n", " ").split(". ") if len(s.strip()) > 20]
    return encoder_reference(model, tokenizer, (sentences or texts)[:256])


def quality(model, tokenizer, kind: str, ref) -> dict:
    """Quality against ``ref`` plus bytes in memory."""
    q = causal_quality(model, tokenizer, ref) if kind == CAUSAL else encoder_quality(model, tokenizer, ref)
    q["memory_bytes"] = memory_bytes(model)
    return q
