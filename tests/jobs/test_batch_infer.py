"""jobs.batch_infer end to end on a real local Ray: every task, bad rows, a killed actor, resume, an artifact."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest
import torch

from compress import models
from jobs import batch_infer
from jobs.predict import Predictor

ROOT = Path(__file__).resolve().parents[2]


def read_out(out: Path) -> list[dict]:
    return pq.read_table(sorted(glob.glob(str(out / "*.parquet")))).to_pylist()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.timeout(300)
def test_generate_keeps_every_row_with_answers_or_errors(ray_local, tmp_path):
    rows = [
        {"prompt": "What is the capital of France?", "max_tokens": 12},
        {"prompt": "What is the capital of Germany?", "temperature": 0.8, "seed": 3, "max_tokens": 6},
        {"prompt": None},
        {"prompt": 5},
        {"prompt": ""},
        {"prompt": "hello " * 9000},
        {"messages": [{"role": "user", "content": "What is the capital of Japan?"}], "max_tokens": 12},
        {"prompt": "Count: one, two, three,", "stop": [","], "max_tokens": 12},
        {"prompt": "Count: one, two, three,", "stop": [",", "."], "max_tokens": 12},
        {"prompt": "Write the numbers from 1 to 100, separated by spaces.", "max_tokens": 12},  # a row's own limit
        {"prompt": "Write the numbers from 1 to 100, separated by spaces."},  # the flag's limit (8)
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    assert batch_infer.main(model="smollm2-135m", input=str(src), output=str(tmp_path / "out"), chat=True,
                            max_tokens=8, cpus_per_actor=0.5, batch_size=4) == 0
    out = sorted(read_out(tmp_path / "out"), key=lambda r: r["source_row"])
    assert [r["source_row"] for r in out] == list(range(len(rows)))  # every row, once
    assert "Paris" in out[0]["generated_text"] and out[0]["num_generated_tokens"] <= 12 and out[0]["error"] is None
    assert out[1]["num_generated_tokens"] <= 6 and out[1]["error"] is None
    assert out[2]["error"] == "column 'prompt' is null" and out[2]["generated_text"] is None
    assert "column 'prompt': expected string, got int" in out[3]["error"]
    assert "empty" in out[4]["error"]
    assert "exceed the limit of 2048 tokens" in out[5]["error"]
    assert "Tokyo" in out[6]["generated_text"] and out[6]["finish_reason"] in ("stop", "length")
    for r in out[7:9]:  # cut at a stop string: something was generated before it, and the reason says so
        assert r["error"] is None and r["generated_text"].strip() and r["finish_reason"] == "stop"
    assert "," not in out[7]["generated_text"]
    assert not {",", "."} & set(out[8]["generated_text"])  # several stop strings
    assert (out[9]["num_generated_tokens"], out[9]["finish_reason"]) == (12, "length")
    assert (out[10]["num_generated_tokens"], out[10]["finish_reason"]) == (8, "length")
    for r in out:
        assert set(r) >= {"prompt", "generated_text", "num_prompt_tokens", "num_generated_tokens", "finish_reason",
                          "error"}

    again = tmp_path / "again"
    batch_infer.main(model="smollm2-135m", input=str(src), output=str(again), chat=True, max_tokens=8,
                     cpus_per_actor=0.5, batch_size=2)
    seeded = {r["source_row"]: r["generated_text"] for r in read_out(again)}
    assert seeded[1] == out[1]["generated_text"]  # a seeded sample is the same in another batch


@pytest.mark.timeout(300)
def test_embed_from_a_folder_of_csv_matches_direct_encoding(ray_local, tmp_path, minilm_loaded):
    folder = tmp_path / "in"
    folder.mkdir()
    texts = ["A man plays the guitar.", "The stock market fell.", "Cats sleep a lot.", "Rain is expected."]
    for k in range(2):
        pa.csv.write_csv(pa.table({"id": [f"{k}-{i}" for i in range(2)], "text": texts[2 * k : 2 * k + 2]}),
                         folder / f"part{k}.csv")
    pa.csv.write_csv(pa.table({"id": ["long"], "text": ["word " * 300]}), folder / "part2.csv")
    batch_infer.main(model="minilm-l6", input=str(folder), output=str(tmp_path / "out"), task="embed",
                     id_column="id", cpus_per_actor=0.5)
    out = {r["id"]: r for r in read_out(tmp_path / "out")}
    assert "exceed the limit of 256 tokens" in out.pop("long")["error"]  # MiniLM's max_seq_length, not cut silently
    assert len(out) == 4 and all(r["error"] is None for r in out.values())
    model, tokenizer, _ = minilm_loaded
    direct = models.encode(model, tokenizer, texts)
    got = torch.tensor([out[f"{i // 2}-{i % 2}"]["embedding"] for i in range(4)])
    assert torch.allclose(got, direct, atol=1e-5)
    assert pq.read_schema(glob.glob(str(tmp_path / "out" / "*.parquet"))[0]).field("embedding").type == \
        pa.list_(pa.float32())


@pytest.mark.timeout(300)
def test_score_matches_the_models_own_log_probabilities(ray_local, tmp_path, tiny_causal_dir):
    texts = ["The cat sat on the mat.", "Paris is the capital of France, a country in Europe."]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    batch_infer.main(model=str(tiny_causal_dir), input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                     task="score", cpus_per_actor=0.5)
    out = sorted(read_out(tmp_path / "out"), key=lambda r: r["source_row"])
    model, tokenizer, _ = models.load(tiny_causal_dir)
    for text, row in zip(texts, out, strict=True):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.inference_mode():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).sum().item()
        assert row["logprob_sum"] == pytest.approx(lp, rel=1e-4, abs=1e-3)
        assert row["perplexity"] == pytest.approx(math.exp(-row["logprob_mean"]))


def score_rows(folder, rows: list[list[int]]) -> list[dict]:
    """The Predictor's scores of token rows, run in this process (no Ray)."""
    predictor = Predictor(str(folder), "score", "text", max_num_seqs=4, max_model_len=512)
    ids = np.empty(len(rows) + 1, dtype=object)  # a column of lists, as Ray Data hands a batch over
    ids[:] = [*rows, []]
    batch = {"_ids": ids, "_params": np.array([""] * (len(rows) + 1), dtype=object),
             "_error": np.array([""] * len(rows) + ["column 'text' is null"], dtype=object)}
    out = predictor(batch)
    assert out["_error"][-1] == "column 'text' is null" and out["_out"][-1] == ""  # a row with an error passes by
    assert list(out["_error"][:-1]) == [""] * len(rows), out["_error"]
    return [json.loads(o) for o in out["_out"][:-1]]


def own_logprob_sum(model, row: list[int]) -> float:
    x = torch.tensor([row])
    with torch.inference_mode():
        return torch.log_softmax(model(x).logits[0, :-1].float(), -1).gather(-1, x[0, 1:, None]).sum().item()


def test_score_takes_the_engines_prompt_logprobs_over_many_prefill_chunks(tiny_causal_dir, tmp_path, smollm2_loaded):
    """Rows longer than a prefill chunk, and a short one beside them: each scored by the engine's prompt
    log-probabilities, equal to the model's own log-softmax; also for a model whose head does more than a linear layer
    (Gemma-2 soft-caps its logits), which runs on the Hugging Face forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from compress import artifact

    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 1000, size=n).tolist() for n in (500, 3, 260, 130)]
    model, _, _ = models.load(tiny_causal_dir)
    for row, got in zip(rows, score_rows(tiny_causal_dir, rows), strict=True):
        lp = own_logprob_sum(model, row)
        assert got["sum"] == pytest.approx(lp, rel=1e-4, abs=1e-3)
        assert got["mean"] == pytest.approx(lp / (len(row) - 1), rel=1e-4, abs=1e-4)

    tokenizer = smollm2_loaded.tokenizer
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, attn_logit_softcapping=None, final_logit_softcapping=5.0,
                                           max_position_embeddings=512, layer_types=["full_attention"] * 2)).eval()
    gemma.config.architectures = ["Gemma2ForCausalLM"]
    folder = artifact.save(gemma, tokenizer, tmp_path / "gemma")
    for row, got in zip(rows[1:3], score_rows(folder, rows[1:3]), strict=True):
        assert got["sum"] == pytest.approx(own_logprob_sum(gemma, row), rel=1e-4, abs=1e-3)


def test_a_csv_column_empty_for_its_first_mib_and_numeric_later_is_read_row_by_row(tmp_path, tiny_causal_dir):
    """CSV cells are text; the job types the columns it reads per row, so a column that is empty in the first
    block (where pyarrow would have fixed its type as null) and numeric later is read, and a bad cell is its row's
    error, not the job's."""
    import csv

    from jobs import inputs, predict

    path = tmp_path / "in.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "max_tokens", "note"])
        w.writerows([f"Row {i}, with a comma: " + "word " * 200, "", ""] for i in range(1100))  # over 1 MiB
        w.writerows([["Short one", "2", "x"], ["Short two", "3", ""], ["Bad one", "lots", "y"]])
    listing = inputs.list_input_files(str(path))
    with listing.fs.open_input_stream(str(path)) as f:
        blocks = list(inputs.tagged_blocks(f, str(path), "csv", listing.root))
    table = pa.concat_tables(blocks)
    assert len(blocks) > 1 and table.num_rows == 1103 and table.column("prompt")[0].as_py().startswith("Row 0, with")
    defaults = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": (), "chat": False,
                "json_schema": None}
    rows = predict.preprocess(table.slice(1098), str(tiny_causal_dir), "generate", "prompt", 4096,
                              defaults).to_pylist()
    budgets = [json.loads(r["_params"])["max_tokens"] if r["_params"] else None for r in rows]
    assert budgets == [8, 8, 2, 3, None]
    assert rows[-1]["_error"] == "column 'max_tokens': expected an integer, got 'lots'"


class DiesOnce(Predictor):
    """A model actor that dies on its second batch, the first time any actor gets there (a marker file remembers it
    across the restarted actors)."""

    marker = ""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_a_killed_actor_is_replaced_and_no_row_is_lost_or_duplicated(ray_local, tmp_path, tiny_causal_dir,
                                                                      monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors get this test's class itself
    dies = type("DiesHere", (DiesOnce,), {"marker": str(tmp_path / "killed")})
    monkeypatch.setattr(batch_infer, "Predictor", dies)
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Story number {i}:"} for i in range(40)])
    batch_infer.main(model=str(tiny_causal_dir), input=str(src), output=str(tmp_path / "out"), max_tokens=4,
                     batch_size=2, cpus_per_actor=0.5)
    assert (tmp_path / "killed").exists(), "the fault was not injected"
    out = read_out(tmp_path / "out")
    assert sorted(r["source_row"] for r in out) == list(range(40))
    assert all(r["error"] is None and r["generated_text"] is not None for r in out)  # replayed, not failed


class DiesOnPoison(Predictor):
    """A model actor that dies whenever it runs a row whose prompt says POISON (as an out-of-memory kill would)."""

    def _run(self, batch, todo, out):
        if any("POISON" in str(batch["prompt"][i]) for i in todo):
            os._exit(1)
        return super()._run(batch, todo, out)


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_a_row_that_kills_its_actor_every_time_gets_an_error_and_the_job_goes_on(ray_local, tmp_path,
                                                                                 tiny_causal_dir, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(batch_infer, "Predictor", DiesOnPoison)
    prompts = [f"Story number {i}:" if i != 7 else "POISON" for i in range(24)]
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])
    code = batch_infer.main(model=str(tiny_causal_dir), input=str(src), output=str(tmp_path / "out"), max_tokens=4,
                            batch_size=2, cpus_per_actor=0.5)
    out = sorted(read_out(tmp_path / "out"), key=lambda r: r["source_row"])
    assert code == 0 and [r["source_row"] for r in out] == list(range(24))  # rows out = rows in, each once
    assert "model actor died" in out[7]["error"] and out[7]["generated_text"] is None
    assert all(r["error"] is None and r["generated_text"] is not None for r in out if r["source_row"] != 7)


@pytest.mark.timeout(420)
@pytest.mark.e2e
def test_resume_after_a_run_killed_halfway(ray_local, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Write a word about the number {i}."} for i in range(48)])
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.batch_infer", "--model", "smollm2-135m", "--input", str(src), "--output",
            str(out), "--max-tokens", "12", "--chat", "--batch-size", "2", "--cpus-per-actor", "0.5"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not glob.glob(str(out / "*.parquet")) and proc.poll() is None:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    first = batch_infer.done_ids(out, ["source_file", "source_row"])
    assert 0 < len(first) < 48, f"the first run should stop halfway, wrote {len(first)} rows"
    with pytest.raises(ValueError, match="pass --resume"):
        batch_infer.main(model="smollm2-135m", input=str(src), output=str(out))
    batch_infer.main(model="smollm2-135m", input=str(src), output=str(out), resume=True, max_tokens=6,
                     batch_size=4, cpus_per_actor=0.5)
    ids = [r["source_row"] for r in read_out(out)]
    assert sorted(ids) == list(range(48))  # the union of both runs: every row exactly once


@pytest.mark.timeout(300)
def test_every_json_line_becomes_a_row_whatever_its_kind_or_block(ray_local, tmp_path, tiny_causal_dir, monkeypatch):
    """Lines that are not JSON objects become error rows. Read tasks type their JSON blocks apart: a column that
    changes kind between blocks, or first appears in a later one, must neither fail the job nor the output files."""
    from jobs import inputs

    monkeypatch.setattr(inputs, "BLOCK_ROWS", 4)  # 26 lines: seven blocks
    good = [json.dumps({"prompt": f"Tell me about the number {i}."}) for i in range(3)]
    rows = [{"prompt": f"Row {i}."} for i in range(20)]
    rows[1]["extra"] = "text"
    rows[9]["extra"] = {"a": 1}  # the job does not read it: kept, as JSON text
    rows[10]["max_tokens"] = 2  # first seen in a later block: the job's own type
    rows[11]["stop"] = [",", "."]
    rows[12]["stop"] = "!"  # one stop string
    rows[13]["temperature"] = 1  # an int where a float goes
    rows[14]["prompt"] = 5  # the wrong kind in a column the job reads: that row's error
    rows[15]["max_tokens"] = "many"
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(good[:2] + ["{not json", "[1, 2]", "7", good[2]] + [json.dumps(r) for r in rows]) + "\n")
    assert batch_infer.main(model=str(tiny_causal_dir), input=str(src), output=str(tmp_path / "out"), max_tokens=3,
                            cpus_per_actor=0.5) == 0
    out = sorted(read_out(tmp_path / "out"), key=lambda r: r["source_row"])  # every file reads back as one table
    assert [r["source_row"] for r in out] == list(range(26))
    assert "line 3 of" in out[2]["error"] and "is not JSON" in out[2]["error"]
    assert "line 4 of" in out[3]["error"] and "a JSON list, not an object" in out[3]["error"]
    assert "line 5 of" in out[4]["error"] and "a JSON int, not an object" in out[4]["error"]
    for r in (out[0], out[1], out[5]):
        assert r["error"] is None and r["num_generated_tokens"] > 0
    typed = out[6:]
    assert (typed[1]["extra"], typed[9]["extra"], typed[0]["extra"]) == ("text", '{"a": 1}', None)
    assert (typed[10]["max_tokens"], typed[11]["stop"], typed[12]["stop"], typed[13]["temperature"]) == \
        (2, [",", "."], ["!"], 1.0)
    assert typed[10]["num_generated_tokens"] <= 2
    assert "column 'prompt': expected string" in typed[14]["error"] and "got int" in typed[14]["error"]
    assert "column 'max_tokens': expected int64" in typed[15]["error"]
    assert [i for i, r in enumerate(typed) if r["error"]] == [14, 15]
    array = tmp_path / "in.json"  # a JSON array of objects works as well as JSON lines
    array.write_text(json.dumps([{"prompt": "One."}, {"prompt": "Two."}, "three"]))
    # input and output as URIs (file:// here; s3:// on a cluster) go through pyarrow's filesystems end to end
    out_uri = f"file://{tmp_path}/out2"
    batch_infer.main(model=str(tiny_causal_dir), input=f"file://{array}", output=out_uri, max_tokens=3,
                     cpus_per_actor=0.5)
    out2 = sorted(read_out(tmp_path / "out2"), key=lambda r: r["source_row"])
    assert [r["error"] is None for r in out2] == [True, True, False] and "element 2" in out2[2]["error"]
    assert batch_infer.done_ids(out_uri, ["source_file", "source_row"]) == {f"in.json\x1f{i}" for i in range(3)}
    with pytest.raises(ValueError, match="already holds"):
        batch_infer.main(model=str(tiny_causal_dir), input=f"file://{array}", output=out_uri)
    assert batch_infer.main(model=str(tiny_causal_dir), input=f"file://{array}", output=out_uri, resume=True) == 0
    # 1 error in 3 rows: above a cap of 20%, the run says so with its exit status
    assert batch_infer.main(model=str(tiny_causal_dir), input=f"file://{array}", output=out_uri, resume=True,
                            max_error_fraction=0.2) == 1


@pytest.mark.timeout(300)
def test_resume_by_id_column_generates_only_the_missing_ids(ray_local, tmp_path, tiny_causal_dir):
    ids = [f"doc-{i:02d}" for i in range(10)]
    rows = pa.table({"id": ids, "prompt": [f"Say something about {i}." for i in ids]})
    out = tmp_path / "out"
    pq.write_table(rows.slice(0, 4), tmp_path / "first.parquet")  # a run that got through the first four
    batch_infer.main(model=str(tiny_causal_dir), input=str(tmp_path / "first.parquet"), output=str(out),
                     id_column="id", max_tokens=3, cpus_per_actor=0.5)
    first = {r["id"]: r["generated_text"] for r in read_out(out)}
    pq.write_table(rows.take([7, 2, 9, 0, 5, 1, 3, 8, 6, 4]), tmp_path / "all.parquet")  # another order
    batch_infer.main(model=str(tiny_causal_dir), input=str(tmp_path / "all.parquet"), output=str(out),
                     id_column="id", resume=True, max_tokens=3, cpus_per_actor=0.5)
    final = read_out(out)
    assert sorted(r["id"] for r in final) == ids  # every id once: the first four were not generated again
    assert {r["id"]: r["generated_text"] for r in final if r["id"] in first} == first
    dup = tmp_path / "dup.jsonl"
    write_jsonl(dup, [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(ValueError, match="repeated values"):
        batch_infer.main(model=str(tiny_causal_dir), input=str(dup), output=str(tmp_path / "o"), id_column="id")
    holes = tmp_path / "holes.jsonl"
    holes.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n{broken\n")
    with pytest.raises(ValueError, match="empty on 1 row"):
        batch_infer.main(model=str(tiny_causal_dir), input=str(holes), output=str(tmp_path / "o"), id_column="id")


@pytest.mark.timeout(300)
def test_a_model_that_fails_gives_every_row_its_error(ray_local, tmp_path, smollm2_loaded, make_tiny_llama):
    """The model itself fails (its embedding table is smaller than the tokenizer's ids): each row records the
    model's error, none is lost, and the job still ends."""
    from compress import artifact

    tokenizer = smollm2_loaded.tokenizer
    model = make_tiny_llama()
    model.resize_token_embeddings(64)
    path = artifact.save(model, tokenizer, tmp_path / "small-vocab")
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"Words about {w}."} for w in ("cats", "rain", "maps")])
    batch_infer.main(model=str(path), input=str(src), output=str(tmp_path / "out"), max_tokens=3, cpus_per_actor=0.5)
    out = read_out(tmp_path / "out")
    assert sorted(r["source_row"] for r in out) == [0, 1, 2]
    for r in out:
        assert r["error"].startswith("model error: ") and "index" in r["error"].lower() and r["generated_text"] is None


def test_bad_invocations_are_refused_with_the_reason(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match="no column 'prompt'"):
        batch_infer.main(model="smollm2-135m", input=str(src), output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--task embed does not fit"):
        batch_infer.main(model="smollm2-135m", input=str(src), output=str(tmp_path / "o"), task="embed")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        batch_infer.main(model="smollm2-135m", input=str(tmp_path / "nope.jsonl"), output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--task 'translate'"):
        batch_infer.main(model="smollm2-135m", input=str(src), output=str(tmp_path / "o"), task="translate")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    for kw, message in [({"engine": "tgi"}, "--engine 'tgi'"), ({"tensor_parallel_size": 2}, "--engine vllm"),
                        ({"engine": "raypress", "num_gpus_per_actor": 2}, "add --engine vllm"),
                        ({"engine": "vllm", "task": "embed", "model": "minilm-l6", "column": "prompt"}, "raypress"),
                        ({"engine": "vllm"}, "make venv-vllm")]:  # this venv has no vLLM (make test-vllm's has)
        with pytest.raises(ValueError, match=message):
            batch_infer.main(**{"model": "smollm2-135m", "input": str(prompts), "output": str(tmp_path / "o"), **kw})


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_the_readme_batch_commands_run_as_written(ray_local, tmp_path):
    """As written, on the test session's Ray (RAY_ADDRESS, as a job on a cluster gets it): starting a Ray of its own
    is what the cluster tests check."""
    import re

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### Batch inference\n\n```bash\n(.*?)```", readme, re.S)[1]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:" + os.environ.get("PATH", ""),
                        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run(["bash", "-ec", block], cwd=tmp_path, env=env | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = pq.read_table(tmp_path / "out" / "answers").to_pylist()
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    assert "Paris" in next(r["generated_text"] for r in rows if "France" in r["prompt"])
    extract = re.search(r"\*\*Structured extraction\.\*\*.*?```bash\n(.*?)```", readme, re.S)[1]
    proc = subprocess.run(["bash", "-ec", extract], cwd=tmp_path, env=env | {"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    places = pq.read_table(tmp_path / "out" / "places").to_pylist()
    assert len(places) == 2 and all(r["finish_reason"] == "stop" for r in places)
    assert {json.loads(r["generated_text"])["country"].lower() for r in places} >= {"canada"}


_PEAKS = """
import json, sys
import ray
ray.init(address=sys.argv[1], configure_logging=False)  # the test session's Ray
from jobs import batch_infer

def peak_mib():  # VmHWM: this process's own peak (ru_maxrss would also count the test process's size at fork)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024

for src, out in zip(sys.argv[3::2], sys.argv[4::2]):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak: each run's own
    code = batch_infer.main(model=sys.argv[2], input=src, output=out, task="score", cpus_per_actor=0.5)
    print(json.dumps({"code": code, "peak_mib": peak_mib()}))
"""


@pytest.mark.timeout(400)
@pytest.mark.e2e
def test_the_driver_never_holds_the_input(ray_local, tmp_path, tiny_causal_dir):
    """Peak memory of the job's driver stays flat when the input grows fivefold: the rows stream from the files
    through Ray Data read tasks to the actors and the writers. (Both runs share one driver process, whose peak is
    reset between them; what the first run leaves in its heap shows as a few MiB of growth.)"""
    payload = "x" * 65536  # 64 KiB per row that the job carries through to its output
    args = []
    for n in (250, 1250):  # ~16 MiB, then ~80 MiB of JSON lines
        src = write_jsonl(tmp_path / f"in-{n}.jsonl", [{"text": f"Row {i} of the input.", "payload": payload}
                                                      for i in range(n)])
        args += [str(src), str(tmp_path / f"out-{n}")]
    proc = subprocess.run([sys.executable, "-c", _PEAKS, ray_local.get_runtime_context().gcs_address,
                           str(tiny_causal_dir), *args], cwd=ROOT, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    small, large = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"code"'))
    assert small["code"] == large["code"] == 0
    for n in (250, 1250):
        out = read_out(tmp_path / f"out-{n}")
        assert len(out) == n and all(r["payload"] == payload and r["error"] is None for r in out)
    grown = large["peak_mib"] - small["peak_mib"]
    print(f"driver peak RSS: {small['peak_mib']:.0f} MiB for 16 MiB of input, {large['peak_mib']:.0f} MiB for 80 MiB")
    assert grown < 32, f"the driver's peak memory grew by {grown:.0f} MiB for 64 MiB more input"


@pytest.mark.timeout(300)
def test_structured_rows_parse_as_their_schema_and_bad_schemas_fail_their_row_alone(ray_local, tmp_path,
                                                                                      smollm2_loaded):
    import re

    import jsonschema

    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}
    colour = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]}
    rows = [{"prompt": f"Describe person number {k}.", "id": k} for k in range(9)]
    rows[1]["json_schema"] = colour  # an object in JSON lines, or the schema's text: both are taken
    rows[2]["json_schema"] = json.dumps(colour)
    rows[3]["json_schema"] = {"type": "object", "properties": {"x": {"type": "no-such-type"}}}  # does not compile
    rows[4]["json_schema"] = "{not json"
    rows[5].update(max_tokens=3, presence_penalty=1.5)  # too short for the record: must say so
    rows[6]["guided_choice"] = ["yes", "no"]  # a row's own grammar replaces the job's
    rows[7]["guided_regex"] = "[0-9]{3}"
    x = smollm2_loaded.tokenizer.convert_tokens_to_ids("x")
    rows[8].update(guided_regex="[a-z]{1,12}", logit_bias={str(x): 100})  # taken wherever the grammar allows it
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert batch_infer.main(model="smollm2-135m", input=str(src), output=str(out), chat=True, max_tokens=48,
                            json_schema=json.dumps(person)) == 0
    got = {r["id"]: r for r in read_out(out)}
    assert sorted(got) == list(range(9))  # rows out = rows in
    for k, schema in ((0, person), (1, colour), (2, colour)):
        assert got[k]["error"] is None and got[k]["finish_reason"] == "stop", got[k]
        jsonschema.validate(json.loads(got[k]["generated_text"]), schema)
    assert "does not compile" in got[3]["error"] and "not JSON" in got[4]["error"]
    assert got[5]["error"] is None and got[5]["finish_reason"] == "length" and got[5]["num_generated_tokens"] == 3
    assert got[6]["generated_text"] in ("yes", "no") and re.fullmatch("[0-9]{3}", got[7]["generated_text"])
    assert set(got[8]["generated_text"]) == {"x"}, got[8]


@pytest.mark.timeout(300)
def test_rows_with_tools_answer_calls_that_parse_and_rows_with_n_answer_every_sample(ray_local, tmp_path):
    import jsonschema

    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}}]
    ask = "What is the weather like in Paris?"
    call = {"id": "call_1", "type": "function",  # a call and its answer in the history
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    rows = [{"id": 0, "prompt": ask, "tools": tools, "tool_choice": "required"},
            {"id": 1, "prompt": ask, "tools": json.dumps(tools), "parallel_tool_calls": False,  # JSON text as well
             "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            {"id": 2, "prompt": ask, "tools": tools, "tool_choice": "none"},  # shown, never called
            {"id": 3, "prompt": ask, "tools": tools, "tool_choice": "auto"},  # SmolLM2's template renders no tools
            {"id": 4, "prompt": ask, "tools": tools, "tool_choice": "nope"},
            {"id": 5, "prompt": "Name a fruit.", "n": 3, "temperature": 1.0, "seed": 7},
            {"id": 6, "prompt": "Name a fruit.", "n": 3, "temperature": 1.0, "seed": 7},  # seeded: repeats row 5
            {"id": 7, "prompt": ask, "tools": tools, "tool_choice": "required", "n": 2, "temperature": 1.0, "seed": 1},
            {"id": 8, "prompt": "Name a fruit.", "n": 99},
            {"id": 9, "messages": [{"role": "user", "content": ask}, {"role": "assistant", "tool_calls": [call]},
                                   {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}],
             "tools": tools, "tool_choice": "none"}]
    out = tmp_path / "out"
    assert batch_infer.main(model="smollm2-135m", input=str(write_jsonl(tmp_path / "in.jsonl", rows)),
                            output=str(out), chat=True, max_tokens=48) == 0
    got = {r["id"]: r for r in read_out(out)}
    assert sorted(got) == list(range(10))

    def calls_of(r):
        calls = json.loads(r["tool_calls"])
        for c in calls:
            assert c["id"].startswith("call_") and c["type"] == "function"
            fn = next(t["function"] for t in tools if t["function"]["name"] == c["function"]["name"])
            jsonschema.validate(json.loads(c["function"]["arguments"]), fn["parameters"])
        return calls

    for k in (0, 1, 7):
        assert got[k]["error"] is None and got[k]["finish_reason"] == "tool_calls", got[k]
        assert calls_of(got[k])
    (only,) = calls_of(got[1])
    assert only["function"]["name"] == "get_weather"
    assert got[2]["tool_calls"] is None and got[2]["generated_text"] and got[2]["finish_reason"] != "tool_calls"
    assert "tool_choice" in got[3]["error"] and "nope" in got[4]["error"] and "'n'" in got[8]["error"]
    assert got[9]["error"] is None and got[9]["generated_text"] and got[9]["tool_calls"] is None
    fruits = [c["text"] for c in got[5]["choices"]]
    assert len(fruits) == 3 and len(set(fruits)) > 1 and fruits == [c["text"] for c in got[6]["choices"]]
    assert got[5]["generated_text"] == fruits[0]
    assert got[5]["num_generated_tokens"] == sum(c["num_generated_tokens"] for c in got[5]["choices"])
    assert len(got[7]["choices"]) == 2 and all(c["finish_reason"] == "tool_calls" for c in got[7]["choices"])
    assert got[0]["choices"] is not None and len(got[0]["choices"]) == 1  # n defaults to 1
