"""The batch job on real clusters: submitted to a head started with `ray start`, and placed on the right node of a
simulated two-node cluster. Both clusters run in their own processes, beside the test session's Ray."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from compress import artifact

pytestmark = pytest.mark.e2e  # `make test-e2e`: own clusters, servers or builds

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}


def _prompts(tmp_path, n=6) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}."}) + "\n" for i in range(n)))
    return src


@pytest.mark.timeout(420)
def test_job_submitted_to_a_ray_start_head_succeeds(tmp_path, tiny_causal_dir, ray_heads):
    temp_dir = f"/tmp/rpt-{uuid.uuid4().hex[:6]}"
    env = _env() | {"RAY_AUTH_MODE": "token"}  # token authentication on, for the cluster and its clients
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--port=6391",
             "--dashboard-host=127.0.0.1", "--dashboard-port=8291", "--num-cpus=2", "--temp-dir", temp_dir,
             "--include-dashboard=true", "--disable-usage-stats",
             # ports of its own: the test session's Ray already holds the defaults
             "--dashboard-agent-listen-port=52391", "--dashboard-agent-grpc-port=52392", "--metrics-export-port=52393",
             "--runtime-env-agent-port=52394", "--ray-client-server-port=52395"]
    session = ray_heads.start(start, env)
    try:
        out = tmp_path / "out"
        runtime_env = {"excludes": [".venv", "artifacts", ".git", "*.egg-info"], "env_vars": {"HF_HUB_OFFLINE": "1"}}
        submit = [str(BIN / "ray"), "job", "submit", "--address", "http://127.0.0.1:8291", "--working-dir", ".",
                  "--runtime-env-json", json.dumps(runtime_env), "--",
                  sys.executable, "-m", "jobs.batch_infer", "--model", str(tiny_causal_dir), "--input",
                  str(_prompts(tmp_path)), "--output", str(out), "--max-tokens", "4", "--cpus-per-actor", "0.5"]
        deadline = time.time() + 120
        while True:  # right after `ray start` the head may have no job agent yet: that submission is refused
            proc = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
            if "No available agent" not in proc.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert proc.returncode == 0 and "succeeded" in proc.stdout.lower(), (proc.stdout + proc.stderr)[-3000:]
        assert "6 rows (6 ok, 0 errors)" in proc.stdout
        assert sorted(r["source_row"] for r in pq.read_table(out).to_pylist()) == list(range(6))
    finally:
        ray_heads.stop(session)


_TWO_NODES = """
import json, os, sys
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

model, prompts, tmp, wikitext = sys.argv[1:]
os.chdir(f"{tmp}/nodes")  # the nodes' own working folder; the driver works in another (below)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
# stands in for a GPU node: Ray counts a GPU there (none is used: the actors ask for none, and are told so)
worker = cluster.add_node(num_cpus=2, num_gpus=1, resources={"accelerator": 1})
os.chdir(f"{tmp}/driver")
ray.init(address=cluster.address)
try:
    from jobs import batch_infer, sweep

    on_worker = json.dumps({"accelerator": 1})
    batch_infer.main(model=model, input=prompts, output="out", max_tokens=4, cpus_per_actor=0.5,
                     actor_resources=on_worker)
    nodes = {a.node_id for a in list_actors(detail=True, limit=10000) if "Predictor" in (a.class_name or "")}
    config = {"model": model, "eval_data": wikitext, "calib_data": wikitext, "seq_len": 64, "eval_blocks": 2,
              "calib_blocks": 4, "specs": ["int4s-g32"], "budget": {"max_ppl_increase": 0.5},
              "export": ["compressed-tensors"]}
    with open("sweep.yaml", "w") as f:
        yaml.safe_dump(config, f)
    code = sweep.main("sweep.yaml", out="sweep-out", store=f"file://{tmp}/store", num_actors=1, cpus_per_actor=0.5,
                      actor_resources=on_worker)
    trials = {a.node_id for a in list_actors(detail=True, limit=10000) if "TrialActor" in (a.class_name or "")}
    print(json.dumps({"predictor_nodes": sorted(nodes), "trial_nodes": sorted(trials), "worker": worker.node_id,
                      "head": cluster.head_node.node_id, "sweep_code": code}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.timeout(500)
def test_jobs_on_a_two_node_cluster_place_actors_and_share_artifacts(tmp_path, tiny_causal_dir, wikitext, ray_heads):
    """Model actors go to the node with the accelerator; a sweep whose trials run there writes its artifacts to a
    store URI that the driver, working in another folder on another node, reads its choice from. Actors given no GPU
    on a node that has one say which setting gives them one (Ray forwards their logs to the driver)."""
    for folder in ("nodes", "driver"):
        (tmp_path / folder).mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _TWO_NODES, str(tiny_causal_dir), str(_prompts(tmp_path)),
                             str(tmp_path), str(wikitext)], cwd=ROOT, env=_env() | {"PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=480)
    finally:
        ray_heads.stop(proc.pid)  # whatever the cluster left, also after a timeout
    assert proc.returncode == 0, stderr[-3000:]
    placed = json.loads(stdout.strip().splitlines()[-1])
    assert placed["predictor_nodes"] == [placed["worker"]] and placed["worker"] != placed["head"]
    idle = "this node has 1 GPU(s) but the model runs on its CPU"
    assert f"{idle}: Ray gives an actor GPUs only when it asks for them. Set --num-gpus-per-actor 1" in stderr + stdout
    assert f"{idle}: Ray gives an actor GPUs only when it asks for them. Set --gpus-per-actor 1" in stderr + stdout
    out = tmp_path / "driver" / "out"
    assert sorted(r["source_row"] for r in pq.read_table(out).to_pylist()) == list(range(6))

    assert placed["trial_nodes"] == [placed["worker"]] and placed["sweep_code"] == 0
    sweep_out = tmp_path / "driver" / "sweep-out"
    rows = {r["spec"]: r for r in pq.read_table(sweep_out / "results.parquet").to_pylist()}
    assert set(rows) == {"base", "int4s-g32"}
    for spec, row in rows.items():
        assert row["error"] is None and row["decode_tokens_per_s_b1"] > 0  # speed: read back from the store
        assert row["artifact"] == f"file://{tmp_path}/store/{spec}"
        assert artifact.verify(tmp_path / "store" / spec)["spec"] == spec
    assert not (sweep_out / "artifacts").exists() and not (tmp_path / "nodes" / "sweep-out").exists()
    chosen = artifact.verify(sweep_out / "chosen")  # copied from the store to the driver's OUT
    assert chosen["spec"] in rows
    served = yaml.safe_load((sweep_out / "serve.yaml").read_text())["applications"][0]["args"]["model"]
    assert served == f"file://{tmp_path}/store/{chosen['spec']}"  # replicas on any node copy it from the store
    exported = json.loads((sweep_out / "chosen-compressed-tensors" / "config.json").read_text())
    assert exported["quantization_config"]["quant_method"] == "compressed-tensors"
