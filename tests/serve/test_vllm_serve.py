"""The serving app with ``engine: vllm`` (vLLM's CPU backend here): the official openai client gets the answers,
streams, grammars, tool calls and log-probabilities raypress's own engine gives. `make test-vllm` runs it."""

import json
import time

import openai
import pytest
import requests

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ARGS = {"model": "smollm2-135m", "max_num_seqs": 4, "max_model_len": 1024, "default_max_tokens": 16}


@pytest.fixture(scope="module")
def urls(deploy, tmp_path_factory):
    store = tmp_path_factory.mktemp("batches")
    return {engine: deploy(engine, {**ARGS, "engine": engine, "model_name": "smol", "batch_storage": str(store)},
                           ray_actor_options={"num_cpus": 0.5})
            for engine in ("raypress", "vllm")}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120)


def test_greedy_answers_streams_and_usage_equal_raypress_engines(urls):
    ours, theirs = client(urls["raypress"]), client(urls["vllm"])
    for question in ("What is the capital of France?", "Name three colours.", "Write one line about the sea."):
        ask = dict(model="smol", messages=[{"role": "user", "content": question}], max_tokens=20, temperature=0)
        a, b = ours.chat.completions.create(**ask), theirs.chat.completions.create(**ask)
        assert b.choices[0].message.content == a.choices[0].message.content and b.choices[0].message.content
        assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (a.usage.prompt_tokens, a.usage.completion_tokens)
        chunks = list(theirs.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == b.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == b.usage.completion_tokens


def test_grammars_tools_n_and_prompt_logprobs_go_through_vllm(urls):
    import jsonschema

    theirs = client(urls["vllm"])
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
              "required": ["city", "population"]}
    r = theirs.chat.completions.create(model="smol", max_tokens=48, messages=[
        {"role": "user", "content": "Describe Paris."}], response_format={
        "type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
    r = theirs.chat.completions.create(model="smol", max_tokens=48, tools=[tool], tool_choice="required",
                                       messages=[{"role": "user", "content": "Weather in Rome?"}])
    (call,) = r.choices[0].message.tool_calls[:1]
    assert r.choices[0].finish_reason == "tool_calls" and "city" in json.loads(call.function.arguments)
    kw = dict(model="smol", messages=[{"role": "user", "content": "Name a fruit."}], n=3, seed=4, temperature=1.0,
              max_tokens=8)
    first, again = theirs.chat.completions.create(**kw), theirs.chat.completions.create(**kw)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len(first.choices) == 3
    prompt = "The quick brown fox jumps over the lazy dog"
    echo = {u: client(urls[u]).completions.create(model="smol", prompt=prompt, echo=True, logprobs=1, max_tokens=1,
                                                  temperature=0).choices[0].logprobs for u in urls}
    assert echo["vllm"].token_logprobs[0] is None and echo["vllm"].tokens == echo["raypress"].tokens
    gap = max(abs(a - b) for a, b in zip(echo["vllm"].token_logprobs[1:], echo["raypress"].token_logprobs[1:],
                                         strict=True))
    print(f"prompt log-probabilities, vLLM vs raypress: max |d| {gap:.2e}")
    assert gap < 1e-3


def test_a_stream_left_early_is_cancelled_in_vllm(urls):
    stats = f"{urls['vllm']}/stats"
    before = requests.get(stats, timeout=30).json()["generation_tokens"]
    with requests.post(f"{urls['vllm']}/v1/completions", stream=True, timeout=120,
                       json={"prompt": "Count to one thousand:", "max_tokens": 1000, "stream": True,
                             "ignore_eos": True}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.time() + 30
    while requests.get(stats, timeout=30).json()["running"] and time.time() < deadline:
        time.sleep(0.5)
    after = requests.get(stats, timeout=30).json()
    assert after["running"] == 0
    assert after["generation_tokens"] - before < 500, after  # aborted: far from the 1000 tokens it asked for


def test_stats_on_vllm_read_its_scheduler_steps_blocks_and_prefix_cache(urls):
    stats = f"{urls['vllm']}/stats"
    before = requests.get(stats, timeout=30).json()
    # vLLM caches full blocks only (128 tokens each on its CPU backend): a prefix of some 350 tokens fills two
    prompt = "A shared system prompt that many requests begin with, long enough to fill a few blocks. " * 20
    for k in range(2):  # the second finds the first's blocks in vLLM's prefix cache
        r = requests.post(f"{urls['vllm']}/v1/completions", timeout=120,
                          json={"prompt": prompt + f"Question {k}:", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200, r.text
    after = requests.get(stats, timeout=30).json()
    print({k: after[k] for k in ("steps", "kv_blocks", "kv_blocks_free", "cached_prompt_tokens", "waiting")})
    assert after["steps"] >= before["steps"] + 8 and after["max_decode_batch"] >= 1  # a step per token at least
    assert 0 < after["kv_blocks_free"] <= after["kv_blocks"] and after["waiting"] == 0
    assert after["cached_prompt_tokens"] - before["cached_prompt_tokens"] >= 128  # the shared prefix's full blocks
    assert 0 < after["prefix_cache_hit_rate"] < 1
