"""engine.core: continuous batching that gives every request what it would get alone."""

import asyncio
import random

import pytest
import torch

from engine.core import Engine
from engine.runner import pack
from engine.sampling import SamplingParams, sample


def hf_greedy(model, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    """Hugging Face's own greedy decoding of one prompt alone, cut at the first end-of-sequence token."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    ends = [k for k, t in enumerate(out) if t in eos]
    return out[: ends[0]] if ends else out


@pytest.fixture
def tok(smollm2_loaded):
    return smollm2_loaded.tokenizer


def random_prompts(n: int, vocab: int, seed: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def real_prompts(tokenizer, n: int) -> list[list[int]]:
    from compress.data import BUILTIN_PROMPTS, chat_prompt

    texts = [" ".join(BUILTIN_PROMPTS[k : k + 1 + k % 4]) for k in range(n)]  # 1 to 4 questions: varied lengths
    return [tokenizer(chat_prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in texts]


def test_greedy_is_token_identical_to_hf_for_requests_arriving_at_different_times(smollm2_loaded):
    model, tokenizer, _ = smollm2_loaded
    prompts = real_prompts(tokenizer, 8)
    lengths = [12, 20, 3, 24, 9, 16, 1, 14]
    engine = Engine(model, tokenizer, max_num_seqs=3, max_model_len=512, max_batch_tokens=64)
    handles = []
    with torch.inference_mode():
        for k, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            handles.append(engine.submit(p, SamplingParams(max_tokens=n)))
            for _ in range(k % 3):  # requests arrive while others are half done
                engine.step()
        while not all(h.done for h in handles):
            engine.step()
    stats = engine.stats()
    assert stats.max_decode_batch == 3  # slots were shared, moved and reused
    # every phase of a step was timed, and the phases account for the steps' time
    assert all(stats.phase_s[p] > 0 for p in ("schedule", "forward_prefill", "forward_decode", "sample", "output"))
    assert 0.9 * stats.step_s.sum <= sum(stats.phase_s.values()) <= stats.step_s.sum
    for p, n, h in zip(prompts, lengths, handles, strict=True):
        g = h.result()
        expected = hf_greedy(model, p, n, engine.eos)
        assert g.token_ids == expected and g.finish_reason == ("length" if len(expected) == n else "stop")
        assert g.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.scheduler.num_running == 0 and engine.pool.num_free == engine.pool.num_blocks


def test_a_long_prompt_is_prefilled_in_chunks_while_running_requests_keep_decoding(smollm2_loaded):
    model, tokenizer, _ = smollm2_loaded
    short = real_prompts(tokenizer, 1)[0]
    long = real_prompts(tokenizer, 4)[3]
    engine = Engine(model, tokenizer, max_num_seqs=2, max_model_len=512, max_batch_tokens=20, prefix_caching=False)
    with torch.inference_mode():
        first = engine.submit(short, SamplingParams(max_tokens=30))
        while not first.generation.token_ids:
            engine.step()
        second = engine.submit(long, SamplingParams(max_tokens=8))
        before = len(first.generation.token_ids)
        steps = 0
        while not second.generation.token_ids:
            engine.step()
            steps += 1
        assert steps == -(-len(long) // 19)  # 19 prompt tokens a step: one of the 20 went to the running request
        assert len(first.generation.token_ids) - before == steps  # which decoded in every one of them
        while not (first.done and second.done):
            engine.step()
    assert first.result().token_ids == hf_greedy(model, short, 30, engine.eos)
    assert second.result().token_ids == hf_greedy(model, long, 8, engine.eos)


def test_cancel_frees_the_slot_within_a_step_and_waiting_requests_take_it(make_tiny_llama, tok):
    model = make_tiny_llama()
    model.generation_config.eos_token_id = None  # HF runs on; the reference is cut at the engine's end tokens
    engine = Engine(model, tok, max_num_seqs=1, max_model_len=256, max_batch_tokens=32)
    a, b = random_prompts(2, model.config.vocab_size, seed=4)
    with torch.inference_mode():
        long = engine.submit(a, SamplingParams(max_tokens=200))
        queued = engine.submit(b, SamplingParams(max_tokens=4))
        for _ in range(3):
            engine.step()
        assert engine.stats().running == 1 and engine.stats().waiting == 1
        long.cancel()
        engine.step()
        assert long.done and long.result().finish_reason == "cancelled" and len(long.result().token_ids) < 10
        while not queued.done:
            engine.step()
    assert queued.result().token_ids == hf_greedy(model, b, 4, engine.eos)


def test_requests_that_cannot_fit_are_refused_with_a_reason(tiny_causal):
    engine = Engine(tiny_causal.model, tiny_causal.tokenizer, max_num_seqs=2, max_model_len=64, max_batch_tokens=32)
    with pytest.raises(ValueError, match="exceeds the engine's max_model_len of 64"):
        engine.submit(list(range(10, 60)), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Engine(tiny_causal.model, tiny_causal.tokenizer, max_num_seqs=8, max_batch_tokens=8)
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(tiny_causal.model, tiny_causal.tokenizer, max_model_len=10**6)


def test_seeded_samples_do_not_depend_on_what_runs_beside_them(make_tiny_llama, tok):
    model = make_tiny_llama()
    prompts = random_prompts(6, model.config.vocab_size, seed=5)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=11)
    alone = Engine(model, tok, max_num_seqs=4).generate([prompts[0]], [seeded])[0]
    others = [SamplingParams(max_tokens=k + 3, temperature=0.7, seed=None) for k in range(5)]
    crowd = Engine(model, tok, max_num_seqs=4).generate(prompts[1:4] + [prompts[0]] + prompts[4:],
                                                           others[:3] + [seeded] + others[3:])
    assert crowd[3].token_ids == alone.token_ids
    greedy = Engine(model, tok, max_num_seqs=4).generate([prompts[0]], [SamplingParams(max_tokens=12)])[0]
    assert alone.token_ids != greedy.token_ids  # temperature is applied, not ignored


def test_sampler_temperature_top_p_and_seeds():
    torch.manual_seed(0)
    logits = torch.randn(1, 500) * 3
    greedy = int(logits.argmax())
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    hot = SamplingParams(temperature=1.0)
    draws = [sample(logits, [hot], [gen(s)])[0] for s in range(20)]
    assert len(set(draws)) > 3 and draws != [greedy] * 20  # really sampled
    assert sample(logits, [hot], [gen(7)]) == sample(logits, [hot], [gen(7)])  # a seed repeats
    for tiny in (1e-6, 5e-324):  # every accepted top_p samples, down to float32's zero
        assert sample(logits, [SamplingParams(temperature=1.0, top_p=tiny)], [gen(1)])[0] == greedy
    for tiny in (5e-324, 1e-30, 1e-5, 1e-3):  # and every accepted temperature: no inf, no NaN
        assert sample(logits, [SamplingParams(temperature=tiny)], [gen(1)])[0] == greedy
    assert sample(logits * 1e4, [SamplingParams(temperature=1.0)], [gen(1)])[0] == greedy  # huge logits too
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.9).sum()) + 1].tolist())
    nucleus_draws = [sample(logits, [SamplingParams(temperature=1.0, top_p=0.9)], [gen(s)])[0] for s in range(200)]
    assert set(nucleus_draws) <= nucleus and len(set(nucleus_draws)) > 1


def test_logprobs_are_the_models_own(make_tiny_llama, tok):
    model = make_tiny_llama()
    prompt = random_prompts(1, model.config.vocab_size, seed=6)[0]
    g = Engine(model, tok, max_num_seqs=2).generate([prompt], [SamplingParams(max_tokens=3, logprobs=2)])[0]
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
    first = g.logprobs[0]
    assert first.token_id == g.token_ids[0] and abs(first.logprob - float(lp[first.token_id])) < 1e-4
    assert [t for t, _ in first.top] == lp.topk(2).indices.tolist() and len(g.logprobs) == 3


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family_architectures_run_on_the_engine(arch, tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None  # HF runs on; the reference is cut at the engine's end tokens
    prompts = random_prompts(4, 300, seed=7)
    engine = Engine(model, tok, max_num_seqs=2, max_batch_tokens=16)
    results = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in (6, 2, 9, 4)])
    for p, n, g in zip(prompts, (6, 2, 9, 4), results, strict=True):
        assert g.token_ids == hf_greedy(model, p, n, engine.eos)


@pytest.mark.timeout(120)
def test_the_engine_thread_streams_events_to_asyncio(tiny_causal):
    engine = Engine(tiny_causal.model, tiny_causal.tokenizer, max_num_seqs=4, num_threads=1).start()
    try:
        async def run():
            handles = [engine.submit([10 + k, 20, 30], SamplingParams(max_tokens=8)) for k in range(3)]
            events = await asyncio.gather(*(_collect(h) for h in handles))
            return handles, events

        handles, events = asyncio.run(run())
        for h, evs in zip(handles, events, strict=True):
            assert evs[-1].finished and all(not e.finished for e in evs[:-1])
            assert "".join(e.text for e in evs) == h.result().text
            assert sum(len(e.token_ids) for e in evs) == len(h.result().token_ids)
        sync = engine.generate([[10, 20, 30]], [SamplingParams(max_tokens=8)])[0]
        assert sync.token_ids == handles[0].result().token_ids
    finally:
        engine.shutdown()


async def _collect(handle):
    return [e async for e in handle]


def test_a_request_whose_sampling_fails_fails_alone(make_tiny_llama, tok, monkeypatch):
    import engine.sampling as sampling

    real = sampling._draw

    def draw(logits, p, generator):  # a fault in one request's sampling, as a NaN distribution would raise
        if p.seed == 666:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, p, generator)

    monkeypatch.setattr(sampling, "_draw", draw)
    model = make_tiny_llama()
    engine = Engine(model, tok, max_num_seqs=4).start()
    try:
        prompts = random_prompts(3, model.config.vocab_size, seed=8)
        params = [SamplingParams(max_tokens=5), SamplingParams(max_tokens=5, temperature=1.0, seed=666),
                  SamplingParams(max_tokens=5, temperature=1.0, seed=1)]
        handles = [engine.submit(p, s) for p, s in zip(prompts, params, strict=True)]
        results = [h.result(timeout=60) for h in handles]
        assert results[1].finish_reason == "error" and "invalid multinomial" in results[1].error
        assert results[0].error is None and results[2].error is None and len(results[2].token_ids) >= 1
        after = engine.submit(prompts[0], SamplingParams(max_tokens=3)).result(timeout=60)  # the thread lives on
        assert after.error is None
    finally:
        engine.shutdown()


@pytest.mark.parametrize("isa", ["avx2", "best"])
def test_the_lean_forward_is_token_identical_to_hf_on_every_instruction_set(smollm2_loaded, isa):
    """The engine's default step (engine.lean) against Hugging Face's own greedy decoding, with the AVX2 kernels
    forced on any CPU and with the best this CPU has."""
    from compress import kernels

    model, tokenizer, _ = smollm2_loaded
    before = kernels.use_isa("avx2" if isa == "avx2" else "")
    try:
        engine = Engine(model, tokenizer, max_num_seqs=4, max_model_len=512, max_batch_tokens=96)
        assert engine.runner.name == "lean"
        prompts = real_prompts(tokenizer, 4)
        lengths = [16, 5, 24, 11]
        results = engine.generate(prompts, [SamplingParams(max_tokens=n) for n in lengths])
        for p, n, g in zip(prompts, lengths, results, strict=True):
            assert g.token_ids == hf_greedy(model, p, n, engine.eos)
    finally:
        kernels.use_isa(before)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int8-dynamic"])
def test_the_lean_forward_matches_hf_forward_on_quantized_modules(make_tiny_llama, tok, scheme):
    from compress import specs

    model = make_tiny_llama()
    specs.apply_(model, scheme)
    prompts = random_prompts(3, model.config.vocab_size, seed=11)
    lean = Engine(model, tok, max_num_seqs=3, max_batch_tokens=128)
    hf = Engine(model, tok, max_num_seqs=3, max_batch_tokens=128, lean=False)
    assert lean.runner.name == "lean" and hf.runner.name == "hf"
    first = []
    with torch.inference_mode():
        for engine in (lean, hf):  # one packed prefill of the three prompts
            for p in prompts:
                engine.submit(p, SamplingParams(max_tokens=6))
            engine._take_inbox(block=False)
            step = engine.scheduler.schedule()
            assert [n for _, n in step.parts] == [len(p) for p in prompts] and step.num_decode == 0
            first.append(engine.runner.forward(pack(step, engine.cache)))
            for seq, _ in step.parts:
                engine.scheduler.free(seq)
    assert first[0].shape == (3, model.config.vocab_size)
    # int8-dynamic rounds activations to 8 bits per token, int4's kernel per block of 32: a last-bit difference in a
    # normalised input (the lean forward's RMSNorm sums in another order) can move one across a rounding boundary
    if scheme == "int8":
        assert torch.allclose(first[0], first[1], rtol=1e-4, atol=1e-4)
    else:
        assert (first[0] - first[1]).norm() / first[1].norm() < 1e-2
    params = [SamplingParams(max_tokens=6)] * 3
    assert [g.token_ids for g in lean.generate(prompts, params)] == [g.token_ids for g in hf.generate(prompts, params)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme", [None, "int8", "int8-dynamic", "int4s-g32", "int4-g64"])
def test_a_decode_step_in_one_op_is_the_layers_run_one_by_one(tok, arch, scheme):
    """The lean forward runs a decode-only step's layers as the extension's one decode_layers op (a float model,
    every weight kind; qwen2's q, k and v biases): its logits are those of the same ops called layer by layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress import kernels, specs

    if kernels.ops() is None:
        pytest.skip("the CPU extension is not built here (its portable path has no fused step)")
    torch.manual_seed(5)
    config = AutoConfig.for_model(arch, vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    if scheme:
        specs.apply_(model, scheme)
    engine = Engine(model, tok, max_num_seqs=3, max_model_len=256, block_size=16)
    runner = engine.runner
    assert runner.name == "lean" and runner.fused is not None
    assert (runner.fused.biases[0].numel() > 0) == (arch == "qwen2")
    for p in random_prompts(3, 300, seed=4, lo=10, hi=40):
        engine.submit(p, SamplingParams(max_tokens=20))
    with torch.inference_mode():
        engine.step()
        while engine.scheduler.num_prefilling:
            engine.step()
        for _ in range(3):  # decode steps: each run both ways, then taken by the engine (the same step again)
            step = engine.scheduler.schedule()
            assert step.num_decode == len(step.parts) == 3
            batch = pack(step, engine.cache)
            fused = runner.forward(batch)
            runner.fused, saved = None, runner.fused
            try:
                one_by_one = runner.forward(batch)
            finally:
                runner.fused = saved
            assert torch.equal(fused, one_by_one)
            engine.step()


@pytest.mark.parametrize("scheme", [None, "int4-g32"])
def test_the_lean_forward_without_the_extension_still_matches_hf(make_tiny_llama, tok, monkeypatch, scheme):
    """Where the CPU kernels cannot load (no compiler, a GPU, another CPU), the lean forward's portable path runs:
    fused products as concatenated module calls, RoPE and the cache write in PyTorch, attention by SDPA."""
    from compress import kernels, specs

    model = make_tiny_llama(layers=3)
    with torch.no_grad():  # sharp attention, so that positions (RoPE) and every cached key change the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    if scheme:
        specs.apply_(model, scheme)
    model.generation_config.eos_token_id = None
    monkeypatch.setattr(kernels, "_extension", lambda: None)
    assert kernels.ops() is None
    prompts = random_prompts(3, model.config.vocab_size, seed=5)
    engine = Engine(model, tok, max_num_seqs=2, max_batch_tokens=16)  # chunked prompts mixed with decodes
    assert engine.runner.name == "lean" and engine.runner.layers[0].qkv.kernel is None and engine.runner.fused is None
    hf = Engine(model, tok, max_num_seqs=2, max_batch_tokens=16, lean=False)
    params = [SamplingParams(max_tokens=n, logprobs=0) for n in (7, 3, 9)]
    ours, theirs = engine.generate(prompts, params), hf.generate(prompts, params)
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert [p.logprob for p in a.logprobs] == pytest.approx([p.logprob for p in b.logprobs], abs=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_the_lean_step_traces_as_one_graph_for_torch_compile(make_tiny_llama, tok, scheme):
    """The extension's ops are real torch ops with fake implementations: a decode step traces without a graph break
    (aot_eager runs the ops on fake tensors, then for real), and gives the eager step's logits."""
    from compress import specs

    model = make_tiny_llama()
    specs.apply_(model, scheme)
    engine = Engine(model, tok, max_num_seqs=2, max_batch_tokens=64)
    for prompt in random_prompts(2, model.config.vocab_size, seed=3):
        engine.submit(prompt, SamplingParams(max_tokens=8))
    running = engine.scheduler.running
    while len(running) < 2 or any(s.num_tokens - s.computed != 1 for s in running):
        engine.step()
    layout = engine.cache.plan([(s.block_table, s.computed + 1) for s in running], [])
    tokens = torch.tensor([s.tokens[-1] for s in running])
    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(engine.runner.__call__, backend="aot_eager", fullgraph=True, dynamic=False)
        assert torch.equal(compiled(tokens, layout, engine.cache), engine.runner(tokens, layout, engine.cache))


def test_requests_after_shutdown_are_refused_and_queued_ones_get_an_error(tiny_causal):
    started = Engine(tiny_causal.model, tiny_causal.tokenizer, max_num_seqs=2).start()
    started.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        started.submit([10, 20, 30], SamplingParams(max_tokens=4))
    idle = Engine(tiny_causal.model, tiny_causal.tokenizer, max_num_seqs=2)  # never started: nothing steps it
    queued = idle.submit([10, 20, 30], SamplingParams(max_tokens=4))
    idle.shutdown()
    result = queued.result(timeout=5)
    assert result.finish_reason == "error" and "shut down" in result.error


def test_a_failure_in_one_requests_output_fails_that_request_alone(make_tiny_llama, tok, monkeypatch):
    import engine.core as core

    real = core.token_event

    def token_event(seq, token, logits, eos):  # a detokenizer or logprobs fault in one request
        if seq.params.seed == 666:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(seq, token, logits, eos)

    monkeypatch.setattr(core, "token_event", token_event)
    model = make_tiny_llama()
    engine = Engine(model, tok, max_num_seqs=4)
    prompts = random_prompts(3, model.config.vocab_size, seed=12)
    params = [SamplingParams(max_tokens=5), SamplingParams(max_tokens=5, seed=666), SamplingParams(max_tokens=5)]
    results = engine.generate(prompts, params)
    assert results[1].finish_reason == "error" and "output failed" in results[1].error
    assert [r.finish_reason for r in (results[0], results[2])] == ["length", "length"]
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.timeout(60)
def test_an_engine_whose_thread_died_fails_its_health_check(tiny_causal, monkeypatch):
    engine = Engine(tiny_causal.model, tiny_causal.tokenizer, max_num_seqs=2)
    engine.check_health()  # not started: nothing to be unhealthy about

    def broken(block):
        raise MemoryError("the inbox could not grow")

    monkeypatch.setattr(engine, "_take_inbox", broken)
    engine.start()
    engine._thread.join(timeout=30)
    with pytest.raises(RuntimeError, match="thread has died"):
        engine.check_health()


def test_models_whose_attention_the_engine_does_not_compute_are_refused_by_name(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma2", vocab_size=300, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256)
    with pytest.raises(ValueError, match="soft-capping"):
        Engine(AutoModelForCausalLM.from_config(config).eval(), tok)
    config = AutoConfig.for_model("qwen2", vocab_size=300, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, use_sliding_window=True, sliding_window=32,
                                  max_window_layers=2)  # a window on some layers only
    if len(set(config.layer_types or ())) > 1:
        with pytest.raises(ValueError, match="attention kinds"):
            Engine(AutoModelForCausalLM.from_config(config).eval(), tok)
