"""The engine's paged KV cache and prefix caching: the same tokens as without them, with less prefill."""

import random

import pytest
import torch

from engine.core import Engine
from engine.sampling import SamplingParams


@pytest.fixture
def sharp_llama(make_tiny_llama):
    """A random Llama whose attention is sharp, so that every cached key and its position change the logits."""
    model = make_tiny_llama(layers=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture
def tok(smollm2_loaded):
    return smollm2_loaded.tokenizer


def prompts_sharing(rng: random.Random, prefix: list[int], n: int, vocab: int) -> list[list[int]]:
    return [prefix + [rng.randrange(10, vocab) for _ in range(rng.randint(1, 20))] for _ in range(n)]


def run_one_by_one(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each request after the one before has finished, so that every later one can find the earlier ones' blocks."""
    return [engine.generate([p], [SamplingParams(max_tokens=max_tokens)])[0].token_ids for p in prompts]


@pytest.mark.parametrize("prefix_len", [0, 16, 16 * 5, 16 * 5 + 7])  # no block, one, many, many and a partial one
def test_greedy_tokens_are_the_same_with_and_without_the_prefix_cache(sharp_llama, tok, prefix_len):
    rng = random.Random(prefix_len)
    vocab = sharp_llama.config.vocab_size
    prefix = [rng.randrange(10, vocab) for _ in range(prefix_len)]
    prompts = prompts_sharing(rng, prefix, 5, vocab)
    cached = Engine(sharp_llama, tok, max_num_seqs=4, max_model_len=256, max_batch_tokens=48)
    plain = Engine(sharp_llama, tok, max_num_seqs=4, max_model_len=256, max_batch_tokens=48, prefix_caching=False)
    assert run_one_by_one(cached, prompts, 12) == run_one_by_one(plain, prompts, 12)
    hits = cached.stats().cache.cached_tokens
    assert hits == 4 * (prefix_len // 16) * 16  # every prompt after the first starts from the cached full blocks
    assert plain.stats().cache.cached_tokens == 0


def test_requests_arriving_together_compute_their_shared_prefix_once(sharp_llama, tok):
    """Six requests with one 80-token prefix, queued at once: the first computes it and the others wait the steps
    it takes, then start from its cached blocks; a request with nothing in common is not held up."""
    rng = random.Random(5)
    vocab = sharp_llama.config.vocab_size
    prefix = [rng.randrange(10, vocab) for _ in range(80)]
    prompts = prompts_sharing(rng, prefix, 6, vocab) + [[rng.randrange(10, vocab) for _ in range(30)]]
    # a step budget that takes every prompt at once (the server's default): only the rule keeps them apart
    cached = Engine(sharp_llama, tok, max_num_seqs=8, max_model_len=256, max_batch_tokens=512)
    plain = Engine(sharp_llama, tok, max_num_seqs=8, max_model_len=256, max_batch_tokens=512, prefix_caching=False)
    params = [SamplingParams(max_tokens=8)] * len(prompts)
    together = cached.generate(prompts, params)  # every request queued before the first step
    assert [g.token_ids for g in together] == [g.token_ids for g in plain.generate(prompts, params)]
    assert [g.num_cached_tokens for g in together] == [0] + [80] * 5 + [0]
    assert cached.stats().cache.cached_tokens == 5 * 80


def test_a_conversation_sent_again_with_its_next_turn_reuses_the_answer_too(smollm2_loaded):
    """Multi-turn chat resends the history: the second turn's prompt holds the first prompt and the model's answer,
    whose blocks were cached as they filled."""
    from compress.data import chat_prompt

    model, tokenizer, _ = smollm2_loaded
    engine = Engine(model, tokenizer, max_num_seqs=2, max_model_len=512)
    first = tokenizer(chat_prompt(tokenizer, "Tell me about the moon."), add_special_tokens=False)["input_ids"]
    answer = engine.generate([first], [SamplingParams(max_tokens=40)])[0]
    second = first + answer.token_ids + tokenizer("\nAnd the sun?", add_special_tokens=False)["input_ids"]
    again = engine.generate([second], [SamplingParams(max_tokens=8)])[0]
    assert again.num_cached_tokens >= (len(first) + len(answer.token_ids) - 1) // 16 * 16 > len(first)
    alone = Engine(model, tokenizer, max_num_seqs=1, max_model_len=512, prefix_caching=False)
    assert again.token_ids == alone.generate([second], [SamplingParams(max_tokens=8)])[0].token_ids


def test_eviction_under_a_small_cache_never_breaks_a_running_sequence(sharp_llama, tok):
    rng = random.Random(1)
    vocab = sharp_llama.config.vocab_size
    prefixes = [[rng.randrange(10, vocab) for _ in range(40)] for _ in range(4)]
    prompts = [rng.choice(prefixes) + [rng.randrange(10, vocab) for _ in range(rng.randint(1, 30))]
               for _ in range(24)]
    params = [SamplingParams(max_tokens=rng.randint(4, 40)) for _ in prompts]
    # 160 positions for 4 sequences of up to ~110: blocks run short, cached ones are evicted, decodes preempt
    small = Engine(sharp_llama, tok, max_num_seqs=4, max_model_len=128, max_batch_tokens=64, kv_cache_tokens=160)
    roomy = Engine(sharp_llama, tok, max_num_seqs=4, max_model_len=128, max_batch_tokens=64, prefix_caching=False)
    got = small.generate(prompts, params)
    assert [g.token_ids for g in got] == [g.token_ids for g in roomy.generate(prompts, params)]
    stats = small.stats().cache
    assert small.pool.evictions > 0 and stats.cached_tokens > 0 and stats.free_blocks == stats.blocks
    assert all(r == 0 for r in small.pool.refs)


def test_preempted_requests_are_recomputed_and_give_the_same_tokens(sharp_llama, tok):
    rng = random.Random(2)
    vocab = sharp_llama.config.vocab_size
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(20, 40))] for _ in range(6)]
    params = [SamplingParams(max_tokens=60)] * 6
    tight = Engine(sharp_llama, tok, max_num_seqs=6, max_model_len=112, max_batch_tokens=64, kv_cache_tokens=224,
                   prefix_caching=False)  # room for two whole sequences: the rest wait or are preempted
    roomy = Engine(sharp_llama, tok, max_num_seqs=6, max_model_len=112, max_batch_tokens=64, prefix_caching=False)
    got = tight.generate(prompts, params)
    assert tight.stats().cache.preemptions > 0
    assert [g.token_ids for g in got] == [g.token_ids for g in roomy.generate(prompts, params)]


def test_cancel_during_a_prefill_that_started_from_cached_blocks(sharp_llama, tok):
    rng = random.Random(3)
    vocab = sharp_llama.config.vocab_size
    prefix = [rng.randrange(10, vocab) for _ in range(64)]
    engine = Engine(sharp_llama, tok, max_num_seqs=2, max_model_len=256, max_batch_tokens=20)
    engine.generate([prefix + [11, 12]], [SamplingParams(max_tokens=2)])
    with torch.inference_mode():
        long = engine.submit(prefix + [rng.randrange(10, vocab) for _ in range(100)], SamplingParams(max_tokens=4))
        engine.step()
        engine.step()  # the prompt is being prefilled in chunks of 20 after its 64 cached positions
        assert engine.scheduler.running[0].computed == 64 + 40
        long.cancel()
        engine.step()
    assert long.result().finish_reason == "cancelled" and long.result().num_cached_tokens == 64
    assert engine.pool.num_free == engine.pool.num_blocks and all(r == 0 for r in engine.pool.refs)
    again = engine.generate([prefix + [13]], [SamplingParams(max_tokens=3)])[0]
    assert again.num_cached_tokens == 64 and again.finish_reason == "length"


def test_a_request_larger_than_the_free_blocks_waits_and_completes(sharp_llama, tok):
    engine = Engine(sharp_llama, tok, max_num_seqs=4, max_model_len=200, max_batch_tokens=256, kv_cache_tokens=208)
    big = list(range(100, 280))  # 180 tokens + 16 new: 13 of the 13 blocks
    small = [list(range(300 + k, 340 + k)) for k in range(2)]
    handles = [engine.submit(p, SamplingParams(max_tokens=16)) for p in small]
    with torch.inference_mode():
        engine.step()
        late = engine.submit(big, SamplingParams(max_tokens=16))
        for _ in range(3):
            engine.step()
            assert engine.scheduler.waiting and engine.scheduler.waiting[0].prompt == big
        while not late.done:
            engine.step()
    assert all(h.done for h in handles) and len(late.result().token_ids) == 16
    alone = Engine(sharp_llama, tok, max_num_seqs=1, max_model_len=200, prefix_caching=False)
    assert late.result().token_ids == alone.generate([big], [SamplingParams(max_tokens=16)])[0].token_ids


def test_the_cache_is_refused_when_it_cannot_hold_one_request(tiny_causal):
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        Engine(tiny_causal.model, tiny_causal.tokenizer, max_model_len=256, kv_cache_tokens=100)
