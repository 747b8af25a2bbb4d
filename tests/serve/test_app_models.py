"""serve.app with models of particular kinds, each deployed on its own: an encoder, a server with an API key, a
tokenizer that adds a BOS, a strict chat template, a model that fails mid-stream, and a compressed-tensors checkpoint
written by the package llm-compressor uses."""

import concurrent.futures as cf
import copy
import json

import openai
import pytest
import requests
import torch
from ray import serve

from compress import models
from serve.app import server_args


@pytest.mark.timeout(300)
def test_embeddings_with_the_openai_client(deploy, minilm_loaded):
    url = deploy("mini", {"model": "minilm-l6", "model_name": "mini"})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    texts = ["A man plays the guitar.", "Someone performs music on a guitar.", "Stock markets fell today."]
    r = client.embeddings.create(model="mini", input=texts)
    got = torch.tensor([d.embedding for d in r.data])
    model, tokenizer, _ = minilm_loaded
    assert torch.allclose(got, models.encode(model, tokenizer, texts), atol=1e-5)
    assert r.usage.prompt_tokens > 0
    bad = requests.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=60)
    assert bad.status_code == 400 and "encoder" in bad.json()["error"]["message"]

    def embed(k: int):  # 32 at once: batched, tokenized on the event loop while the batch encodes in a thread
        inputs = [f"Sentence number {k} about topic {j}." for j in range(1 + k % 3)]
        return inputs, requests.post(f"{url}/v1/embeddings", json={"input": inputs}, timeout=120)

    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(embed, range(32)))
    for inputs, r in answers:
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        assert torch.allclose(got, models.encode(model, tokenizer, inputs), atol=1e-5)
    for body, message in [({"input": ""}, "non-empty"), ({"input": []}, "non-empty"),
                          ({"input": ["ok", ""]}, "non-empty"), ({"input": "word " * 600}, "the model takes at most"),
                          ({"input": "word " * 300}, "the model takes at most 256")]:  # MiniLM's max_seq_length
        r = requests.post(f"{url}/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
        assert r.json()["error"]["param"] == "input"
    serve.delete("mini")


@pytest.mark.timeout(300)
def test_api_key_on_and_off(deploy, tiny_causal_dir, monkeypatch):
    tiny = tiny_causal_dir
    monkeypatch.setenv("RAYPRESS_API_KEY", "s3cret")
    url = deploy("keyed", {"model": str(tiny), "model_name": "tiny"})
    body = {"prompt": "hi", "max_tokens": 2}
    assert requests.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    r = requests.post(f"{url}/v1/completions", json=body, headers=wrong, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()
    assert requests.get(f"{url}/health", timeout=30).status_code == 200  # health needs no key
    key = {"Authorization": "Bearer s3cret"}
    for page in ("/docs", "/redoc", "/openapi.json"):  # the schema is served to key holders only
        assert requests.get(url + page, timeout=30).status_code == 401, page
        assert requests.get(url + page, headers=key, timeout=30).status_code == 200, page
    assert requests.get(f"{url}/v1/batches/health", timeout=30).status_code == 401  # no route named so is exempt

    # refused before the body is read: the answer comes while the client is still sending. What it has sent by
    # then is what the sockets' buffers and Serve's proxy took in meanwhile (here ~10 MiB of the upload, ~90 MiB of
    # the chunked GiB while the replica counted its first 8 MiB), not the whole.
    status, sent = _stream_body(url, "/v1/files", {"Content-Length": str(200 << 20),
                                                   "Content-Type": "multipart/form-data; boundary=x"}, 200 << 20)
    assert status == 401 and sent < 64 << 20, (status, sent)
    chunked = {**key, "Transfer-Encoding": "chunked", "Content-Type": "application/json"}
    assert _stream_body(url, "/v1/chat/completions", chunked, 20 << 20)[0] == 413  # no length to check: counted
    status, sent = _stream_body(url, "/v1/chat/completions", chunked, 1 << 30)
    assert status == 413 and sent < 512 << 20, (status, sent)
    assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    monkeypatch.delenv("RAYPRESS_API_KEY")
    with pytest.raises(ValueError, match="RAYPRESS_API_KEY"):  # an application arg would show in `serve config`
        server_args({"model": str(tiny), "api_key": "s3cret"})
    key_file = tiny.parent / "key.txt"
    key_file.write_text("from-a-file\n")
    assert server_args({"api_key_file": str(key_file)})["api_key"] == "from-a-file"
    url = deploy("keyed", {"model": str(tiny), "model_name": "tiny"})  # redeployed without a key
    assert requests.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    serve.delete("keyed")


def _stream_body(url: str, path: str, headers: dict, size: int) -> tuple[int, int]:
    """POST ``size`` bytes of body in 256 KiB pieces (chunked when the headers say so), reading the answer as soon
    as the server sends one; returns (status, bytes sent by then)."""
    import http.client
    import select
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.putrequest("POST", parts.path + path)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    chunked, piece, sent = headers.get("Transfer-Encoding") == "chunked", b"{" * (256 << 10), 0
    try:
        while sent < size and not select.select([conn.sock], [], [], 0)[0]:  # stop once an answer is waiting
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        if chunked and sent >= size:
            conn.send(b"0\r\n\r\n")
    except OSError:  # the server closed the connection: its answer is already on the wire
        pass
    response = conn.getresponse()
    status = response.status
    conn.close()
    return status, sent


@pytest.fixture
def bos_model_dir(tmp_path_factory, smollm2_loaded, make_tiny_llama):
    """A tiny model whose tokenizer puts a BOS before raw text, as Llama's and Mistral's do."""
    from tokenizers.processors import TemplateProcessing

    from compress import artifact

    tok = copy.deepcopy(smollm2_loaded.tokenizer)
    tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                       special_tokens=[("<|im_start|>", 1)])
    # saved as a sweep saves its choice: a folder named chosen, the base model in the manifest
    return artifact.save(make_tiny_llama(), tok, tmp_path_factory.mktemp("bos") / "chosen",
                         manifest={"base_model": {"id": "bos-llama"}})


@pytest.mark.timeout(300)
def test_raw_prompts_get_the_tokenizers_bos_and_an_artifact_is_served_as_its_base_model(deploy, bos_model_dir):
    tok = models.tokenizer_for(str(bos_model_dir))[0]
    url = deploy("bos", {"model": str(bos_model_dir)})
    bos = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in bos.models.list().data] == ["bos-llama"]  # the manifest's base model, not "chosen"
    raw = bos.completions.create(model="bos-llama", prompt="Hello there", max_tokens=2, temperature=0)
    assert tok("Hello there")["input_ids"][0] == 1
    assert raw.usage.prompt_tokens == len(tok("Hello there")["input_ids"])  # with the BOS
    messages = [{"role": "user", "content": "Hello there"}]
    chat = bos.chat.completions.create(model="bos-llama", messages=messages, max_tokens=2, temperature=0)
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])  # no second BOS
    serve.delete("bos")
    import pyarrow as pa

    from jobs.predict import preprocess  # the batch job tokenizes the same way

    rows = pa.Table.from_pylist([{"prompt": "Hello there", "messages": None},
                                 {"prompt": None, "messages": [{"role": "user", "content": "Hello there"}]}])
    out = preprocess(rows, str(bos_model_dir), "generate", "prompt", 512, {"max_tokens": 2, "temperature": 0.0,
                                                                             "top_p": 1.0, "seed": None, "stop": ()})
    assert out.column("_ids").to_pylist() == [tok("Hello there")["input_ids"],
                                              tok(templated, add_special_tokens=False)["input_ids"]]
    assert out.schema.field("_ids").type == pa.list_(pa.int32())  # token ids travel as list<int32>, not JSON


STRICT_TEMPLATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                   "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}assistant: ")


@pytest.mark.timeout(300)
def test_a_chat_template_that_rejects_the_messages_gives_400(deploy, tiny_causal_dir, tmp_path):
    import shutil

    from compress import artifact

    strict = tmp_path / "strict"
    shutil.copytree(tiny_causal_dir, strict)
    loaded = models.load(strict)
    loaded.tokenizer.chat_template = STRICT_TEMPLATE
    artifact.save(loaded.model, loaded.tokenizer, strict)
    url = deploy("strict", {"model": str(strict), "model_name": "strict", "num_threads": 1},
                 ray_actor_options={"num_cpus": 0.25})
    ok = requests.post(f"{url}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    bad = requests.post(f"{url}/v1/chat/completions", timeout=60,
                        json={"messages": [{"role": "assistant", "content": "hi"}], "max_tokens": 2})
    error = bad.json()["error"]
    assert bad.status_code == 400 and error["param"] == "messages" and "must alternate" in error["message"]
    serve.delete("strict")


@pytest.mark.timeout(300)
def test_a_model_failure_mid_stream_ends_the_stream_with_an_error_event(deploy, make_tiny_llama, smollm2_loaded,
                                                                         tmp_path):
    """The model itself fails (its embedding table is smaller than the tokenizer's ids): a stream ends with an
    OpenAI error event instead of hanging or cutting the connection, and a plain request gets a 500 body."""
    from compress import artifact

    model = make_tiny_llama()
    model.resize_token_embeddings(64)
    path = artifact.save(model, smollm2_loaded.tokenizer, tmp_path / "broken")
    url = deploy("broken", {"model": str(path), "model_name": "broken", "num_threads": 1},
                 ray_actor_options={"num_cpus": 0.25})
    body = {"prompt": "Tell me a story about a dragon.", "max_tokens": 4}
    plain = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=60, stream=True) as r:
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "index" in error["message"].lower()
    serve.delete("broken")


@pytest.mark.timeout(300)
def test_a_checkpoint_llm_compressor_wrote_is_served_on_raypress_kernels(deploy, make_tiny_llama, smollm2_loaded,
                                                                         package_checkpoint, tmp_path):
    """A compressed-tensors W4A16 checkpoint with zero points, written by the package as llm-compressor writes it:
    served from its folder, its layers on raypress's int4 kernels, answering as the engine does on it directly."""
    from compressed_tensors.quantization import QuantizationArgs

    from compress import qmodules
    from engine.core import Engine
    from engine.sampling import SamplingParams

    tok = smollm2_loaded.tokenizer
    path = tmp_path / "tiny-w4a16"
    w4a16 = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    package_checkpoint(make_tiny_llama(hidden=128), tok, w4a16, None, path)
    url = deploy("ct", {"model": str(path)})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny-w4a16"]
    served = client.completions.create(model="tiny-w4a16", prompt="Hello there", max_tokens=8, temperature=0)
    serve.delete("ct")
    loaded = models.load(path)
    assert type(loaded.model.model.layers[0].mlp.up_proj) is qmodules.Int4WeightOnlyLinear
    (direct,) = Engine(loaded.model, tok).generate([tok("Hello there")["input_ids"]],
                                                   [SamplingParams(max_tokens=8, temperature=0.0)])
    assert served.choices[0].text == direct.text and served.usage.completion_tokens == len(direct.token_ids)
