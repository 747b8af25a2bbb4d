"""engine.logits and what the engine does with a request's parameters: penalties, bias, end tokens, prompt
log-probabilities, n sequences of one prompt, and guided decoding (xgrammar)."""

import json
import re

import pytest
import torch

from engine.core import Engine
from engine.logits import shape_
from engine.request import Sequence
from engine.sampling import Guided, SamplingParams


def seq_with(params: SamplingParams, prompt: list[int], output: list[int]) -> Sequence:
    seq = Sequence("r", prompt, params, None, None)
    for t in output:
        seq.append(t)
    return seq


def test_penalties_bias_and_min_tokens_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    seq = seq_with(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [4], [0, 0, 2])
    x = logits.clone()
    shape_(x, [seq], ends=set())
    # token 0 twice: 2 - 2 x 0.5 - 0.25; token 2 once: 0.5 - 0.5 - 0.25; the prompt's token 4 is not generated
    assert torch.allclose(x, torch.tensor([[0.75, -1.0, -0.25, 3.0, 1.0]]))

    seq = seq_with(SamplingParams(repetition_penalty=2.0), [1], [3])
    x = logits.clone()
    shape_(x, [seq], ends=set())
    assert torch.allclose(x, torch.tensor([[2.0, -2.0, 0.5, 1.5, 1.0]]))  # positive / 2, negative x 2

    seq = seq_with(SamplingParams(logit_bias=((1, 100.0), (3, -100.0))), [0], [])
    x = logits.clone()
    shape_(x, [seq], ends=set())
    assert torch.allclose(x, torch.tensor([[2.0, 99.0, 0.5, -97.0, 1.0]]))

    seq = seq_with(SamplingParams(min_tokens=2, stop_token_ids=(2,)), [0], [1])
    x = logits.clone()
    shape_(x, [seq], ends={3})
    assert x[0, 3] == -float("inf") and x[0, 2] == -float("inf") and x[0, 0] == 2.0
    seq.append(1)  # two tokens out: the end tokens are allowed again
    x = logits.clone()
    shape_(x, [seq], ends={3})
    assert torch.equal(x, logits)

    plain = seq_with(SamplingParams(), [0], [0, 0])
    x = logits.clone()
    shape_(x, [plain], ends={3})
    assert torch.equal(x, logits)  # a request that asks for nothing is not touched


@pytest.fixture(scope="module")
def tiny(smollm2_loaded):
    from tests.conftest import tiny_llama

    return tiny_llama(smollm2_loaded.tokenizer, layers=2, hidden=64, seed=3), smollm2_loaded.tokenizer


def test_logit_bias_bans_and_forces_tokens(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_num_seqs=4)
    prompt = tok("The weather today is", add_special_tokens=False)["input_ids"]
    free = engine.generate([prompt], [SamplingParams(max_tokens=12, ignore_eos=True)])[0].token_ids
    banned = sorted(set(free))
    out = engine.generate([prompt], [SamplingParams(max_tokens=12, ignore_eos=True,
                                                    logit_bias=tuple((t, -100.0) for t in banned))])[0]
    assert len(out.token_ids) == 12 and not set(out.token_ids) & set(banned)
    forced = engine.generate([prompt], [SamplingParams(max_tokens=5, temperature=1.0, seed=4,
                                                       logit_bias=((777, 100.0),))])[0]
    assert forced.token_ids == [777] * 5


def test_stop_token_ids_end_a_request_and_ignore_eos_runs_past_the_end_token(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_num_seqs=4)
    prompt = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    free = engine.generate([prompt], [SamplingParams(max_tokens=10, ignore_eos=True)])[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    out = engine.generate([prompt], [SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(stop_at,))])[0]
    assert out.token_ids == free[:first] and out.finish_reason == "stop"
    # the model's end token as the only choice: it ends the request, unless ignore_eos
    eos = tok.eos_token_id
    ended = engine.generate([prompt], [SamplingParams(max_tokens=6, logit_bias=((eos, 100.0),))])[0]
    assert ended.token_ids == [] and ended.finish_reason == "stop"
    ignored = engine.generate([prompt], [SamplingParams(max_tokens=6, ignore_eos=True, logit_bias=((eos, 100.0),))])
    assert ignored[0].token_ids == [eos] * 6 and ignored[0].finish_reason == "length"
    held = engine.generate([prompt], [SamplingParams(max_tokens=6, min_tokens=3, logit_bias=((eos, 100.0),))])[0]
    assert len(held.token_ids) == 3 and held.finish_reason == "stop" and eos not in held.token_ids


@pytest.mark.parametrize("lean", [True, False])
def test_prompt_logprobs_are_the_models_own_log_softmax(tiny, lean):
    model, tok = tiny
    prompt = tok("A prompt long enough to be prefilled in several chunks of a few tokens each, so that the "
                 "log-probabilities are gathered across chunk boundaries.", add_special_tokens=False)["input_ids"]
    engine = Engine(model, tok, max_num_seqs=2, max_batch_tokens=8, lean=lean)
    other = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # prefilled beside it: its rows must not mix in
    g = engine.generate([other, prompt], [SamplingParams(max_tokens=1), SamplingParams(max_tokens=1,
                                                                                     prompt_logprobs=2)])[1]
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(prompt)
    for i, got in enumerate(g.prompt_logprobs[1:], start=1):
        assert got.token_id == prompt[i]
        assert abs(got.logprob - lp[i - 1, prompt[i]].item()) < 1e-4
        assert [t for t, _ in got.top] == lp[i - 1].topk(2).indices.tolist()
    # the first token drawn after the prompt is the greedy one of the last position
    assert g.token_ids == [int(lp[-1].argmax())]


def test_n_sequences_share_one_prefill_and_repeat_with_a_seed(tiny):
    model, tok = tiny
    prompt = list(range(100, 180))  # five blocks of 16
    engine = Engine(model, tok, max_num_seqs=4, block_size=16).start()
    try:
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=11)
        first = [h.result(timeout=60) for h in engine.submit_n(prompt, params, 3)]
        stats = engine.stats()
        again = [h.result(timeout=60) for h in engine.submit_n(prompt, params, 3)]
    finally:
        engine.shutdown()
    texts = [g.token_ids for g in first]
    assert texts == [g.token_ids for g in again]  # a seeded request repeats, all n of it
    assert len({tuple(t) for t in texts}) == 3  # sample i draws with seed + i
    # the two siblings found the leader's four full blocks of prompt (its last token is always computed)
    assert [g.num_cached_tokens for g in first] == [0, 64, 64]
    assert stats.cache.cached_tokens == 128 and stats.cache.prompt_tokens == 3 * len(prompt)


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_loaded):
    engine = Engine(smollm2_loaded.model, smollm2_loaded.tokenizer, max_num_seqs=8, max_model_len=512).start()
    yield engine
    engine.shutdown()


def chat(tok, text: str) -> list[int]:
    from compress.data import chat_prompt

    return tok(chat_prompt(tok, text), add_special_tokens=False)["input_ids"]


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                               "maxItems": 3}},
     "required": ["colour", "tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number"}}, "required": ["x", "y"]},
        "ok": {"type": "boolean"}}, "required": ["point", "ok"]},
]


@pytest.mark.timeout(300)
def test_guided_output_always_parses_as_its_schema_choice_or_pattern(smollm2_engine, smollm2_loaded):
    import jsonschema  # a requirement of ray
    tok = smollm2_loaded.tokenizer
    questions = ["Describe a person.", "Pick a colour and some tags.", "Give me a point.", "Tell me about Paris.",
                 "What is 2 + 2?", "Write a haiku."]
    handles = []
    for i, q in enumerate(questions):
        for j, schema in enumerate(SCHEMAS):
            params = SamplingParams(max_tokens=96, temperature=0.7 if (i + j) % 2 else 0.0, seed=i,
                                    guided=Guided("json_schema", json.dumps(schema)))
            handles.append((schema, smollm2_engine.submit(chat(tok, q), params)))
    choice = smollm2_engine.submit(chat(tok, "Is the sky blue?"), SamplingParams(
        max_tokens=8, guided=Guided("choice", json.dumps(["yes", "no", "maybe not"]))))
    pattern = r"[A-Z][a-z]{2,8} [0-9]{1,3}"
    regex = smollm2_engine.submit(chat(tok, "Name and number?"), SamplingParams(
        max_tokens=16, guided=Guided("regex", pattern)))
    anything = smollm2_engine.submit(chat(tok, "A JSON object, please."), SamplingParams(
        max_tokens=64, guided=Guided("json_object")))
    for schema, h in handles:
        g = h.result(timeout=240)
        assert g.finish_reason == "stop", g.text
        jsonschema.validate(json.loads(g.text), schema)
    assert choice.result(timeout=60).text in ("yes", "no", "maybe not")
    assert re.fullmatch(pattern, regex.result(timeout=60).text)
    g = anything.result(timeout=60)
    assert g.finish_reason != "stop" or isinstance(json.loads(g.text), dict)


def test_a_grammar_that_does_not_compile_is_refused_before_it_is_queued(smollm2_engine, smollm2_loaded):
    tok = smollm2_loaded.tokenizer
    with pytest.raises(ValueError, match="does not compile"):
        smollm2_engine.submit(chat(tok, "hi"), SamplingParams(guided=Guided("grammar", "root ::= (")))
    with pytest.raises(ValueError, match="not JSON"):
        Guided("json_schema", "{not json")
