"""serve.app over real HTTP on a local Ray, with the official openai client."""

import concurrent.futures as cf
import enum
import itertools
import json
import threading
import time

import openai
import pydantic
import pytest
import requests
import torch

from compress.data import chat_prompt


@pytest.fixture(scope="module")
def smol_url(deploy):
    return deploy("smol", {"model": "smollm2-135m", "model_name": "smol", "num_threads": 2})


@pytest.fixture(scope="module")
def client(smol_url):
    return openai.OpenAI(base_url=f"{smol_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.timeout(300)
def test_openai_client_completions_equal_the_model_run_directly(client, smollm2_loaded):
    model, tokenizer, _ = smollm2_loaded
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        direct = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    new = [t for t in direct.tolist() if t != tokenizer.eos_token_id]
    expected = tokenizer.decode(new, skip_special_tokens=True)
    assert r.choices[0].text == expected and "Paris" in expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(new)


@pytest.mark.timeout(300)
def test_openai_client_chat_and_streaming(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3  # token by token, not one blob
    assert "".join(pieces) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.timeout(300)
def test_sampling_parameters_may_differ_within_a_batch(smol_url):
    prompt = "Once upon a time"
    bodies = [{"prompt": prompt, "max_tokens": 8, "temperature": 0},
              {"prompt": prompt, "max_tokens": 3, "temperature": 0},
              {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 7},
              {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 7}]
    with cf.ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda b: requests.post(f"{smol_url}/v1/completions", json=b, timeout=120).json(), bodies))
    assert out[1]["usage"]["completion_tokens"] <= 3 and out[1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert out[0]["choices"][0]["text"].startswith(out[1]["choices"][0]["text"])  # greedy: a prefix of the longer
    assert out[2]["choices"][0]["text"] == out[3]["choices"][0]["text"]  # same seed, same sample


@pytest.mark.timeout(300)
def test_32_concurrent_requests_are_batched_and_all_answered(smol_url):
    questions = ["What is the capital of France?", "What is the capital of Germany?",
                 "What is the capital of Japan?", "How many days are in a week?"]
    answers = ["Paris", "Berlin", "Tokyo", "7"]

    def ask(i):
        body = {"messages": [{"role": "user", "content": questions[i % 4]}], "max_tokens": 12, "temperature": 0}
        return i, requests.post(f"{smol_url}/v1/chat/completions", json=body, timeout=240)

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    for i, r in results:
        assert r.status_code == 200, r.text
        assert answers[i % 4] in r.json()["choices"][0]["message"]["content"]
    stats = requests.get(f"{smol_url}/stats", timeout=30).json()
    assert stats["max_decode_batch"] > 1 and stats["running"] == 0, stats


@pytest.mark.parametrize("body,param", [
    ("{not json", None),
    ({"prompt": 5, "max_tokens": 4}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "hi", "model": "gpt-4"}, "model"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hello " * 9000, "max_tokens": 4}, "max_tokens"),
    ('{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),  # a lone UTF-16 surrogate: no tokenizer takes it
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),  # OpenAI's cap of 4 stop strings
    ({"prompt": ["hi"] * 65, "max_tokens": 1}, "prompt"),  # more prompts than max_items_per_request (64)
    ({"prompt": "hi", "frobnicate": True}, "frobnicate"),  # a field nobody defines: refused, never dropped
    ({"prompt": "hi", "best_of": 3}, "best_of"),  # OpenAI's, not implemented: refused by name with the reason
    ({"prompt": "hi", "suffix": "and so on"}, "suffix"),
    ({"prompt": "hi", "logit_bias": {"999999": 5}}, "logit_bias"),  # not a token id of this model
    ({"prompt": [5, 999999], "max_tokens": 2}, "prompt"),  # token ids outside the vocabulary
    ({"prompt": "hi", "n": 17}, "n"),
    ({"prompt": "hi", "guided_grammar": "root ::= ("}, None),  # does not compile: 400, not 500
    ({"prompt": "hi", "guided_regex": "a+", "guided_choice": ["x"]}, "guided_choice"),  # two grammars at once
    ({"prompt": "hi", "echo": True, "stream": True}, "echo"),
])
@pytest.mark.timeout(120)
def test_bad_requests_get_400_with_an_openai_error_body(smol_url, body, param):
    kw = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = requests.post(f"{smol_url}/v1/completions", timeout=60, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert param in (err["param"] or "") or param in err["message"]
    assert requests.get(f"{smol_url}/health", timeout=30).status_code == 200  # the replica stays healthy


@pytest.mark.timeout(120)
def test_a_body_over_the_size_cap_gets_413_before_it_is_read(smol_url):
    r = requests.post(f"{smol_url}/v1/completions", data=b"{" + b" " * (9 << 20) + b"}", timeout=60,
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 8388608 bytes" in r.json()["error"]["message"]


@pytest.mark.timeout(120)
def test_embeddings_of_a_causal_model_are_refused(smol_url):
    r = requests.post(f"{smol_url}/v1/embeddings", json={"input": "hello"}, timeout=60)
    assert r.status_code == 400 and "embeddings need an encoder" in r.json()["error"]["message"]


# -- the engine behind the routes ---------------------------------------------------------------------------------


def stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=30).json()


def sse_texts(response) -> list[dict]:
    """The JSON bodies of a server-sent event stream, up to [DONE]."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: "):]))
    return out


@pytest.mark.timeout(300)
def test_a_short_request_finishes_while_a_long_stream_runs(smol_url):
    long = {"messages": [{"role": "user", "content": "Write a long story about a dragon and a knight."}],
            "max_tokens": 160, "temperature": 0, "stream": True}
    events = {}

    def stream():
        with requests.post(f"{smol_url}/v1/chat/completions", json=long, stream=True, timeout=240) as r:
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: ") and "content" in line:
                    events.setdefault("first", time.perf_counter())
        events["stream_done"] = time.perf_counter()

    t = threading.Thread(target=stream)
    t.start()
    while "first" not in events:
        time.sleep(0.05)
    short = requests.post(f"{smol_url}/v1/completions", json={"prompt": "2 + 2 =", "max_tokens": 3, "temperature": 0},
                          timeout=120)
    short_done = time.perf_counter()
    t.join()
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] >= 1
    assert short_done < events["stream_done"]  # it did not wait for the stream to end


@pytest.mark.timeout(300)
def test_a_disconnected_stream_is_cancelled_and_frees_its_slot(smol_url):
    before = stats(smol_url)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with requests.post(f"{smol_url}/v1/completions", json=body, stream=True, timeout=120) as r:
        lines = r.iter_lines(decode_unicode=True)
        got = [line for line in itertools.islice(lines, 12) if line.startswith("data: ")]
    assert got  # the stream was running; closing the response hangs up
    deadline = time.time() + 60
    while stats(smol_url)["running"] and time.time() < deadline:
        time.sleep(0.2)
    after = stats(smol_url)
    assert after["running"] == 0
    assert after["generation_tokens"] - before["generation_tokens"] < 200  # far from the 400 it was asked for
    ok = requests.post(f"{smol_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200

    before = stats(smol_url)  # a plain request whose client gives up is cancelled too
    with pytest.raises(requests.Timeout):
        requests.post(f"{smol_url}/v1/completions", timeout=3,
                      json={"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0})
    deadline = time.time() + 60
    while stats(smol_url)["running"] and time.time() < deadline:
        time.sleep(0.2)
    after = stats(smol_url)
    assert after["running"] == 0 and after["generation_tokens"] - before["generation_tokens"] < 200


@pytest.mark.timeout(300)
def test_a_seeded_sample_is_the_same_alone_and_under_load(smol_url):
    seeded = {"prompt": "My favourite animal is", "max_tokens": 16, "temperature": 1.0, "seed": 1234}
    post = lambda b: requests.post(f"{smol_url}/v1/completions", json=b, timeout=180).json()  # noqa: E731
    alone = post(seeded)["choices"][0]["text"]
    others = [{"prompt": f"Fact {k}: the ocean", "max_tokens": 4 + 7 * k, "temperature": 0.9 * (k % 2)}
              for k in range(6)]
    with cf.ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(post, b) for b in others[:3]] + [pool.submit(post, seeded)]
        futures += [pool.submit(post, b) for b in others[3:]]
        crowd = futures[3].result()["choices"][0]["text"]
        assert all("choices" in f.result() for f in futures)
    greedy = post({**seeded, "temperature": 0})["choices"][0]["text"]
    assert crowd == alone and alone != greedy


@pytest.mark.parametrize("prompt", ["Translate into French: The theatre café is near the old château.",
                                    "Translate 'thank you' into Japanese, Chinese and Korean."])
@pytest.mark.timeout(300)
def test_streamed_deltas_join_to_the_non_streamed_text_also_with_a_stop_string(client, smollm2_loaded, prompt):
    tokenizer = smollm2_loaded.tokenizer
    messages = [{"role": "user", "content": prompt}]
    kw = {"model": "smol", "messages": messages, "max_tokens": 48, "temperature": 0}

    def streamed(**extra):
        chunks = list(client.chat.completions.create(stream=True, **kw, **extra))
        return [c.choices[0].delta.content or "" for c in chunks if c.choices], chunks[-1].choices[0].finish_reason

    whole = client.chat.completions.create(**kw).choices[0].message.content
    pieces, _ = streamed()
    assert "".join(pieces) == whole and not whole.isascii()  # the second answer has characters split over tokens
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    texts = [tokenizer.decode([i]) for i in ids]
    k = next(k for k in range(len(ids) // 3, len(ids)) if len(texts[k - 1].strip()) >= 2 and len(texts[k]) >= 2)
    stop = texts[k - 1][-2:] + texts[k][:2]  # spans two tokens
    cut = client.chat.completions.create(stop=[stop], **kw)
    pieces, finish = streamed(stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.index(stop)] == "".join(pieces)
    assert cut.choices[0].finish_reason == finish == "stop"
    assert not any(stop in p for p in pieces)


@pytest.mark.timeout(300)
def test_logprobs_in_chat_and_completions(client):
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 and c.logprob >= c.top_logprobs[-1].logprob for c in content)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy picks the most likely
    c = client.completions.create(model="smol", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert "".join(lp.tokens) == c.choices[0].text


@pytest.mark.timeout(120)
def test_metrics_page_in_prometheus_text(smol_url):
    text = requests.get(f"{smol_url}/metrics", timeout=30).text
    for name in ("raypress_requests_running", "raypress_requests_waiting", "raypress_generation_tokens_total",
                 "raypress_time_to_first_token_seconds_bucket", "raypress_step_seconds_count",
                 'raypress_step_phase_seconds_total{model="smol",phase="forward_decode"}'):
        assert name in text
    total = next(line for line in text.splitlines() if line.startswith("raypress_generation_tokens_total"))
    assert float(total.split()[-1]) > 0


@pytest.mark.timeout(300)
def test_models_list_and_a_list_of_prompts(client):
    assert [m.id for m in client.models.list().data] == ["smol"]
    prompts = ["The capital of France is", "Two plus two equals"]
    both = client.completions.create(model="smol", prompt=prompts, max_tokens=6, temperature=0)
    alone = [client.completions.create(model="smol", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


@pytest.mark.timeout(300)
def test_streamed_usage_comes_last_and_only_when_asked_for(client):
    prompt = "Here is a list of fruits: apple, banana,"
    whole = client.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])  # usage comes once, in a chunk of its own
    chat = list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi!"}],
                                               max_tokens=5, temperature=0, stream=True))
    assert chat[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chat)
    off = list(client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi!"}],
                                              max_tokens=5, stream=True, stream_options={"include_usage": False}))
    assert all(c.usage is None for c in off)


@pytest.mark.timeout(300)
def test_max_completion_tokens_stop_and_top_p_are_applied(client):
    messages = [{"role": "user", "content": "Write the numbers from 1 to 100, separated by spaces."}]
    r = client.chat.completions.create(model="smol", messages=messages, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    counting = "Count: one, two, three,"
    free = client.completions.create(model="smol", prompt=counting, max_tokens=12, temperature=0)
    cut = client.completions.create(model="smol", prompt=counting, max_tokens=12, temperature=0, stop=[","])
    assert "," in free.choices[0].text  # without the stop string the text goes on past a comma
    assert cut.choices[0].text == free.choices[0].text.split(",")[0] and cut.choices[0].finish_reason == "stop"
    greedy = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8, temperature=0)
    nucleus = [client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                         top_p=1e-9, seed=s).choices[0].text for s in range(3)]
    assert nucleus == [greedy.choices[0].text] * 3  # a nucleus of one token is greedy, whatever the seed
    tiny = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Once upon a time"}],
                                          max_tokens=8, temperature=5e-324, top_p=5e-324)  # float32 zeros: greedy
    assert tiny.choices[0].message.content == client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=8,
        temperature=0).choices[0].message.content
    hot = {client.completions.create(model="smol", prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                     seed=s).choices[0].text for s in range(3)}
    assert len(hot) > 1  # ... while the same seeds without top_p sample


# -- the rest of OpenAI's fields (and vLLM's extras) -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_chat_fields_the_server_does_not_implement_are_refused_by_name(smol_url):
    def post(**body):
        return requests.post(f"{smol_url}/v1/chat/completions", json={"max_tokens": 2, **body}, timeout=60)

    hi = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    for body, param in [({"functions": [tool["function"]]}, "functions"), ({"audio": {"voice": "x"}}, "audio"),
                        ({"messages": image}, "messages.0.content"), ({"reasoning_effort": "high"}, "reasoning_effort"),
                        ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages.0.colour")]:
        r = post(**{"messages": hi, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert "image_url" in post(messages=[{"role": "user", "content": [{"type": "image_url"}]}]).text
    assert "tools" in post(messages=hi, functions=[tool["function"]]).json()["error"]["message"]
    # values that ask for nothing pass, as clients send them by default
    ok = post(messages=hi, tools=[], best_of=1, parallel_tool_calls=True, store=False, user="u-1")
    assert ok.status_code == 200, ok.text
    parts = post(messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                                        {"type": "text", "text": "of France?"}]}], temperature=0)
    whole = post(messages=[{"role": "user", "content": "What is the capital\nof France?"}], temperature=0)
    assert parts.json()["choices"][0]["message"] == whole.json()["choices"][0]["message"]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    age: int = pydantic.Field(ge=0, le=120)


class Colour(str, enum.Enum):
    red, green, blue = "red", "green", "blue"


class Palette(pydantic.BaseModel):
    favourite: Colour
    others: list[Colour] = pydantic.Field(max_length=3)


class Point(pydantic.BaseModel):
    x: float = pydantic.Field(ge=-10, le=10)
    y: float
    label: str | None = pydantic.Field(default=None, max_length=12)


class Shape(pydantic.BaseModel):
    points: list[Point] = pydantic.Field(min_length=1, max_length=3)
    closed: bool


@pytest.mark.timeout(300)
def test_the_openai_clients_parse_returns_an_object_of_each_schema(client):
    questions = ["Tell me about a famous scientist.", "Describe your best friend.", "Who wrote Hamlet?",
                 "What colours do you like?", "Describe a sunset.", "Draw a triangle.", "Give me two points.",
                 "Invent a character for a story.", "What is a rainbow made of?", "Plot the origin.",
                 "Who is the president?", "Paint a room.", "Name a painter.", "A square, please.", "Hello!",
                 "What is 2 + 2?", "Pick a flag's colours.", "Describe a line.", "Who are you?", "Any polygon."]
    schemas = [Person, Palette, Shape]

    def ask(k: int):
        schema = schemas[k % 3]
        r = client.chat.completions.parse(model="smol", messages=[{"role": "user", "content": questions[k]}],
                                          response_format=schema, max_tokens=128, temperature=0.7, seed=k)
        return schema, r.choices[0]

    with cf.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    for schema, choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, schema)
    json_object = client.chat.completions.create(model="smol", max_tokens=64, response_format={"type": "json_object"},
                                                 messages=[{"role": "user", "content": "A JSON object about cats."}])
    if json_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_object.choices[0].message.content), dict)


@pytest.mark.timeout(300)
def test_echo_gives_the_prompts_own_log_probabilities(client, smollm2_loaded):
    model, tokenizer, _ = smollm2_loaded
    prompt = "The quick brown fox jumps over the lazy dog because it"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for sent in (prompt, ids):  # text, and token ids as lm-evaluation-harness sends them
        r = client.completions.create(model="smol", prompt=sent, echo=True, logprobs=1, max_tokens=1, temperature=0)
        got = r.choices[0].logprobs
        assert r.choices[0].text.startswith(prompt)
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        assert len(got.token_logprobs) == len(ids) + 1  # the prompt's tokens, then the one generated
        for i in range(1, len(ids)):
            assert abs(got.token_logprobs[i] - lp[i - 1, ids[i]].item()) < 1e-4
        assert "".join(got.tokens[: len(ids)]) == prompt and got.text_offset[: 2] == [0, len(got.tokens[0])]
        assert got.tokens[-1] == tokenizer.decode([int(lp[-1].argmax())])


@pytest.mark.timeout(300)
def test_penalties_bias_and_n_change_the_output_as_defined(client, smollm2_loaded):
    tok = smollm2_loaded.tokenizer
    prompt = "Count: one, two, three, four,"
    free = client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0)
    ids = tok(free.choices[0].text, add_special_tokens=False)["input_ids"]
    banned = {str(t): -100 for t in set(ids)}
    cut = client.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0, logit_bias=banned)
    assert not set(tok(cut.choices[0].text, add_special_tokens=False)["input_ids"]) & set(ids)
    forced = client.completions.create(model="smol", prompt=prompt, max_tokens=3, logit_bias={"28": 100})
    assert forced.choices[0].text == tok.decode([28] * 3)
    repeat = "the the the the the the the the"
    plain = client.completions.create(model="smol", prompt=repeat, max_tokens=8, temperature=0)
    penalised = client.completions.create(model="smol", prompt=repeat, max_tokens=8, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].text != penalised.choices[0].text
    seeded = [client.chat.completions.create(model="smol", n=3, seed=5, max_tokens=12, temperature=1.0,
                                             messages=[{"role": "user", "content": "Name a fruit."}])
              for _ in range(2)]
    texts = [[c.message.content for c in r.choices] for r in seeded]
    assert texts[0] == texts[1] and [c.index for c in seeded[0].choices] == [0, 1, 2]
    assert len(set(texts[0])) > 1 and seeded[0].usage.prompt_tokens == seeded[1].usage.prompt_tokens
    streamed = list(client.chat.completions.create(model="smol", n=3, seed=5, max_tokens=12, temperature=1.0,
                                                   messages=[{"role": "user", "content": "Name a fruit."}],
                                                   stream=True, stream_options={"include_usage": True}))
    joined = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == k)
              for k in range(3)]
    assert joined == texts[0] and streamed[-1].usage.completion_tokens == seeded[0].usage.completion_tokens
    choice = client.completions.create(model="smol", prompt="Is the sky blue? Answer:", max_tokens=4,
                                       extra_body={"guided_choice": [" yes", " no"]})
    assert choice.choices[0].text in (" yes", " no")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                                       "required": ["zone"]}}}


@pytest.mark.timeout(300)
def test_required_and_named_tool_calls_always_parse_as_the_functions_schema(client, smol_url):
    import jsonschema

    ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
    named = client.chat.completions.create(model="smol", messages=ask, tools=[WEATHER, TIME], max_tokens=64,
                                           temperature=0,  # sampled, a 40-character city may run past max_tokens
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    for k in range(4):
        required = client.chat.completions.create(model="smol", messages=ask, tools=[WEATHER, TIME], max_tokens=64,
                                                  tool_choice="required", temperature=1.0, seed=k)
        assert required.choices[0].message.tool_calls  # one call or several (parallel_tool_calls is on by default)
        for call in required.choices[0].message.tool_calls:
            fn = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
            jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    # the call and its result go back in the history; the model answers in text
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [named.choices[0].message.tool_calls[0]
                                                                            .model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = client.chat.completions.create(model="smol", messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=24, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    for body, param in [({"tool_choice": "auto"}, "tool_choice"),  # SmolLM2's template renders no tools: said so
                        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice")]:
        r = requests.post(f"{smol_url}/v1/chat/completions", timeout=60,
                          json={"messages": ask, "tools": [WEATHER], "max_tokens": 8, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.timeout(300)
def test_tool_calls_stream_whole_in_the_last_chunk_as_the_unstreamed_answer_gives_them(client):
    ask = [{"role": "user", "content": "What is the weather like in Oslo?"}]
    for k in range(3):
        kw = dict(model="smol", messages=ask, tools=[WEATHER, TIME], tool_choice="required", max_tokens=64,
                  temperature=1.0, seed=k)
        whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
        chunks = list(client.chat.completions.create(**kw, stream=True))
        assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # a call is never sent as text
        with client.chat.completions.stream(**kw) as stream:  # the openai client joins the deltas itself
            joined = stream.get_final_completion().choices[0]
        assert joined.finish_reason == "tool_calls" and chunks[-1].choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in joined.message.tool_calls] == \
            [(c.function.name, c.function.arguments) for c in whole]
    # tool_choice none streams text as before
    text = client.chat.completions.create(model="smol", messages=ask, tools=[WEATHER], tool_choice="none",
                                          max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in text if c.choices)


@pytest.mark.timeout(300)
def test_parallel_tool_calls_lets_the_grammar_take_a_list_of_calls_and_false_holds_it_to_one(client, smollm2_loaded):
    import jsonschema

    # pushed up with +100: taken wherever the grammar allows it
    bracket = smollm2_loaded.tokenizer.convert_tokens_to_ids("[")
    ask = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
    kw = dict(model="smol", messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=96, temperature=0,
              logit_bias={str(bracket): 100}, logprobs=True)
    several = client.chat.completions.create(**kw).choices[0]
    one = client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert several.finish_reason == one.finish_reason == "tool_calls"
    assert len(several.message.tool_calls) >= 1 and len(one.message.tool_calls) == 1
    for call in several.message.tool_calls + one.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the list form is what the bias reached for; held to one call, the grammar did not let the answer start with it
    assert several.logprobs.content[0].token == "[" and one.logprobs.content[0].token == "{"
