"""jobs.sweep end to end on a real local Ray, with a tiny random model as the base."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from compress import artifact, evaluate, models
from jobs import sweep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_model_dir(tiny_causal, tmp_path) -> Path:
    return artifact.save(tiny_causal.model, tiny_causal.tokenizer, tmp_path / "tiny")


def write_config(tmp_path, model_dir, wikitext, **overrides) -> Path:
    cfg = {
        "model": str(model_dir), "eval_data": str(wikitext), "calib_data": str(wikitext),
        "seq_len": 64, "eval_blocks": 2, "calib_blocks": 4,
        "specs": ["int8", "int4-g{g}", "wanda-50%", "distill-L5"], "grid": {"g": [32, 64]},
        "budget": {"max_ppl_increase": 0.05}, "objective": "smallest",
    }
    cfg.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(300)
def test_small_sweep_measures_every_spec_records_a_failure_and_chooses(ray_local, tmp_path, tiny_model_dir, wikitext,
                                                                        tiny_causal, package_checkpoint, caplog,
                                                                        capsys):
    from compressed_tensors.quantization import QuantizationArgs

    # a variant of the same model compressed elsewhere (the compressed-tensors package, as llm-compressor writes)
    w4a16 = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    package_checkpoint(tiny_causal.model, tiny_causal.tokenizer, w4a16, None, tmp_path / "llmc")
    out = tmp_path / "out"
    cfg = write_config(tmp_path, tiny_model_dir, wikitext, specs=["int8", "int4m-g{g}", "wanda-50%", "distill-L5"],
                       export=["compressed-tensors", "gguf"], checkpoints={"llmc-w4a16": str(tmp_path / "llmc")})
    code = sweep.main(str(cfg), out=str(out), num_actors=2)
    assert code == 0
    # the choice (int4 offset by each group's float minimum) has a GGUF form (Q4_1) and no compressed-tensors one:
    # that is said, and the sweep's result stands
    assert "compressed-tensors: not exported" in capsys.readouterr().out
    assert not (out / "chosen-compressed-tensors").exists() and len(list((out / "chosen-gguf").glob("*.gguf"))) == 1
    rows = {r["spec"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert set(rows) == {"base", "int8", "int4m-g32", "int4m-g64", "wanda-50%", "distill-L5", "llmc-w4a16"}
    llmc = rows["llmc-w4a16"]  # measured from its own folder, on raypress's int4 kernels, as the rest are
    assert llmc["artifact"] == str((tmp_path / "llmc").resolve())
    assert llmc["artifact_bytes"] < rows["base"]["artifact_bytes"]
    assert llmc["ppl"] == pytest.approx(rows["int4m-g32"]["ppl"], rel=0.05)
    assert "fewer layers" in rows["distill-L5"]["error"]  # a failing spec is recorded; the others finish
    for spec, row in rows.items():
        if spec != "distill-L5":
            assert row["error"] is None and row["decode_tokens_per_s_b1"] > 0 and row["artifact_bytes"] > 0
            assert row["speed_engine"] == "raypress" and row["speed_error"] is None  # auto, no GPUs: raypress's
    assert rows["int4m-g64"]["artifact_bytes"] < rows["int8"]["artifact_bytes"] < rows["base"]["artifact_bytes"]

    report = (out / "report.md").read_text()
    assert "Chosen: `int4m-g64`" in report and "| base |" in report and "error: ValueError" in report
    assert f"Speed measured on raypress's engine, {rows['base']['speed_device']}." in report
    assert (out / "pareto.png").stat().st_size > 10_000 and (out / "pareto.parquet").exists()
    serve_cfg = yaml.safe_load((out / "serve.yaml").read_text())
    assert serve_cfg["applications"][0]["args"] == {"model": str((out / "chosen").resolve())}  # raypress's engine

    # The chosen artifact reloads, and its quality measured again agrees with the report.
    chosen, tokenizer, kind = models.load(out / "chosen")
    texts = json.loads((out / "texts.json").read_text())["eval"]
    base, _, _ = models.load(tiny_model_dir)
    ref = evaluate.reference(base, tokenizer, kind, texts, 64, 2)
    again = evaluate.quality(chosen, tokenizer, kind, ref)
    assert again["ppl"] == pytest.approx(rows["int4m-g64"]["ppl"], rel=1e-5)
    assert again["top1_agreement"] == pytest.approx(rows["int4m-g64"]["top1_agreement"], abs=1e-6)

    # A rerun keeps what is done. A row measured under another config (its fingerprint differs) is run again and
    # the log says so; --retry-failed runs the failed spec again; the rest stay as they were.
    table = pq.read_table(out / "results.parquet").to_pylist()
    for r in table:
        if r["spec"] == "int8":
            r["fingerprint"] = "written-by-another-config"
    from jobs import report as report_module

    report_module.write_results(out, table)
    with caplog.at_level(logging.INFO, logger="jobs.sweep"):
        assert sweep.main(str(cfg), out=str(out), num_actors=1, retry_failed=True) == 0
    assert "the sweep config changed since 1 result(s) were written" in caplog.text and "['int8']" in caplog.text
    assert "--retry-failed: re-running ['distill-L5']" in caplog.text
    after = {r["spec"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert set(after) == set(rows)
    for spec, row in after.items():
        rerun = spec in ("int8", "distill-L5")
        assert (row["finished_at"] != rows[spec]["finished_at"]) == rerun, spec
        assert row["fingerprint"] == after["base"]["fingerprint"]


@pytest.mark.timeout(300)
def test_no_variant_within_budget_writes_no_choice_and_says_so(ray_local, tmp_path, tiny_model_dir, wikitext):
    out = tmp_path / "out"
    cfg = write_config(tmp_path, tiny_model_dir, wikitext, specs=["int4-g32", "wanda-50%", "auto"], grid={},
                       budget={"min_top1_agreement": 1.01}, speed=False)
    assert sweep.main(str(cfg), out=str(out), num_actors=2) == sweep.NO_VARIANT_EXIT
    assert not (out / "chosen").exists() and not (out / "serve.yaml").exists()
    report = (out / "report.md").read_text()
    assert "No variant meets the budget" in report
    rows = {r["spec"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    found = json.loads(rows["auto"]["notes"])["auto"]  # even the top of auto's range misses: that is its row
    assert found["spec"] == "mixed-8.5bit" and not found["found"] and len(found["probes"]) == 1
    assert "| auto: mixed-8.5bit | fail: min_top1_agreement" in report

    # The budget changes: auto (which depends on it) runs again and finds the smallest mix within it, measured
    # probe by probe; the rows that do not depend on the budget stay as they were.
    cfg = write_config(tmp_path, tiny_model_dir, wikitext, specs=["int4-g32", "wanda-50%", "auto", "auto-dynamic"],
                       grid={}, budget={"max_ppl_increase": 0.01, "min_top1_agreement": 0.9}, speed=False)
    assert sweep.main(str(cfg), out=str(out), num_actors=1) == 0
    after = {r["spec"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert after["int4-g32"]["finished_at"] == rows["int4-g32"]["finished_at"]
    notes = json.loads(after["auto"]["notes"])
    found, mix = notes["auto"], notes[notes["auto"]["spec"]]
    bits = float(found["spec"][len("mixed-"):-len("bit")])
    passing = [p["bits"] for p in found["probes"] if p["passed"]]
    assert found["found"] and min(passing) == bits and mix["bits"] <= bits
    assert all(p["bits"] <= bits for p in found["probes"] if not p["passed"])  # every miss was below the find
    assert all(("error" not in p and p["ppl"] <= after["base"]["ppl"] * 1.01 and p["top1_agreement"] >= 0.9)
               == p["passed"] for p in found["probes"])  # an error: fewer bits than the smallest formats take
    print(f"auto found {found['spec']} ({mix['formats']}) in {len(found['probes'])} probes")
    report = (out / "report.md").read_text()
    assert f"auto: {found['spec']}" in report and f"### `auto: {found['spec']}`: each layer's format" in report
    assert "| blocks | self_attn.q_proj |" in report
    sensitivity = pq.read_table(out / "sensitivity.parquet").to_pylist()
    assert {r["layer"] for r in sensitivity if r["variant"] == f"auto: {found['spec']}"} == set(mix["layers"])
    assert all(r["predicted_kl"] >= 0 for r in sensitivity)
    assert artifact.load(after["auto"]["artifact"], device="cpu")[0] is not None  # reloads from its manifest
    # auto-dynamic: the fewest layers on float activations (the rest int8-dynamic) within the same budget
    found = json.loads(after["auto-dynamic"]["notes"])["auto-dynamic"]
    kept = int(found["spec"].rsplit("-", 1)[1])
    assert found["spec"].startswith("smooth-int8-dynamic-") and found["found"]  # a Llama: SmoothQuant first
    assert min(p["float_activation_percent"] for p in found["probes"] if p["passed"]) == 100 - kept
    assert f"auto-dynamic: {found['spec']}" in report
    model = artifact.load(after["auto-dynamic"]["artifact"], device="cpu")[0]
    print(f"auto-dynamic found {found['spec']} in {len(found['probes'])} probes")
    assert {type(m).__name__ for m in model.modules()} >= {"Int8DynamicLinear"}


@pytest.mark.parametrize("override,message", [
    ({"specs": ["int8", "int3-g64"]}, "unknown step 'int3-g64'"),
    ({"budget": {"max_perplexity": 0.1}}, "budget key 'max_perplexity'"),
    ({"budget": {"min_cosine": 0.99}}, "budget key 'min_cosine' is not known for a causal model"),
    ({"objective": "cheapest"}, "objective 'cheapest'"),
    ({"specs": ["int4-g{gs}"], "grid": {"g": [32]}}, "uses \\['gs'\\]"),
    ({"speeed": True}, "unknown key\\(s\\) \\['speeed'\\]"),
    ({"checkpoints": {"llmc": "/no/such/folder"}}, "checkpoints: llmc: '/no/such/folder' is not a model folder"),
    ({"specs": ["int8", "auto"], "budget": {}}, "'auto' finds the smallest variant within the budget"),
])
def test_config_errors_name_the_key_before_any_trial(tmp_path, tiny_model_dir, wikitext, override, message):
    cfg = write_config(tmp_path, tiny_model_dir, wikitext, **override)
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", str(cfg), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    import re

    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "out" / "results.parquet").exists()


@pytest.mark.parametrize("model, engine, message", [
    ("tiny", "tgi", "--engine 'tgi': expected one of"),
    ("minilm-l6", "vllm", "encoders .embeddings. run on raypress's engine"),
    ("tiny", "vllm", "make venv-vllm"),  # this venv has no vLLM (make test-vllm's has)
])
def test_a_speed_engine_that_cannot_run_is_refused_before_any_trial(tmp_path, tiny_model_dir, wikitext, model,
                                                                    engine, message):
    budget = {"max_ppl_increase": 0.05} if model == "tiny" else {"min_cosine": 0.9}
    cfg = write_config(tmp_path, tiny_model_dir if model == "tiny" else model, wikitext, specs=["int8"], grid={},
                       budget=budget)
    with pytest.raises(ValueError, match=message):
        sweep.main(str(cfg), out=str(tmp_path / "out"), engine=engine)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(420)
@pytest.mark.e2e
def test_killed_sweep_resumes_without_evaluating_a_spec_twice(ray_local, tmp_path, tiny_model_dir, wikitext):
    out = tmp_path / "out"
    specs_list = ["int8", "int4-g32", "int4-g64", "prune-50%", "wanda-50%", "prune-2:4"]
    cfg = write_config(tmp_path, tiny_model_dir, wikitext, specs=specs_list, grid={}, speed=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.sweep", str(cfg), "--out", str(out), "--num-actors", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (out / "results.parquet").exists() and pq.read_table(out / "results.parquet").num_rows >= 3:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the first run wrote no results in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    first = {r["spec"]: r["finished_at"] for r in pq.read_table(out / "results.parquet").to_pylist()}
    assert 3 <= len(first) < len(specs_list) + 1, first

    assert sweep.main(str(cfg), out=str(out), num_actors=2) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    specs_seen = [r["spec"] for r in rows]
    assert sorted(specs_seen) == sorted(["base"] + specs_list)  # every spec once
    for r in rows:
        if r["spec"] in first:
            assert r["finished_at"] == first[r["spec"]], f"{r['spec']} was evaluated again"


@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_a_dead_trial_actor_is_replaced_and_no_actor_outlives_the_trials(ray_local, tmp_path, tiny_model_dir,
                                                                         wikitext):
    """The actor running int8 dies (as an out-of-memory kill would end it); its replacement runs the specs left,
    and every actor, the replacement too, is gone before the speed phase needs their CPUs."""
    import ray

    from jobs.sweep_config import load_config

    class DiesOnInt8(sweep.TrialActor):  # defined here: Ray ships it by value to the actors
        def run(self, spec: str) -> dict:
            if spec == "int8":
                os._exit(1)
            return super().run(spec)

    cfg = load_config(str(write_config(tmp_path, tiny_model_dir, wikitext, specs=["int8", "int4-g32", "int4-g64"],
                                       grid={}, speed=False)))
    texts = sweep._texts(cfg, tmp_path)
    free_before = ray.available_resources().get("CPU", 0)
    rows = sweep.run_trials(cfg, tmp_path, str(tmp_path / "store"), [], *texts, num_actors=1,
                            placement={"num_cpus": 0.5, "num_gpus": 0, "resources": None}, trial_actor=DiesOnInt8)
    by_spec = {r["spec"]: r for r in rows}
    assert set(by_spec) == {"base", "int8", "int4-g32", "int4-g64"}
    assert by_spec["int8"]["error"].startswith("trial actor died")
    assert all(by_spec[s]["error"] is None for s in ("base", "int4-g32", "int4-g64"))
    deadline = time.time() + 60  # their CPUs come back (a leaked actor would hold its 0.5 CPU for good)
    while (free := ray.available_resources().get("CPU", 0)) < free_before:
        assert time.time() < deadline, f"{free_before - free} CPU still held by trial actors"
        time.sleep(0.5)
