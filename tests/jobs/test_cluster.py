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

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}


def _prompts(tmp_path, n=6) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}."}) + "\n" for i in range(n)))
    return src


@pytest.mark.timeout(420)
def test_job_submitted_to_a_ray_start_head_succeeds(tmp_path, tiny_causal_dir):
    temp_dir = f"/tmp/rpt-{uuid.uuid4().hex[:6]}"  # its processes carry this path: we stop exactly them
    env = _env() | {"RAY_AUTH_MODE": "token"}  # token authentication on, for the cluster and its clients
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--port=6391",
             "--dashboard-host=127.0.0.1", "--dashboard-port=8291", "--num-cpus=2", "--temp-dir", temp_dir,
             "--include-dashboard=true", "--disable-usage-stats",
             # ports of its own: the test session's Ray already holds the defaults
             "--dashboard-agent-listen-port=52391", "--dashboard-agent-grpc-port=52392", "--metrics-export-port=52393",
             "--runtime-env-agent-port=52394", "--ray-client-server-port=52395"]
    try:
        subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
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
        assert sorted(r["row_index"] for r in pq.read_table(out).to_pylist()) == list(range(6))
    finally:
        subprocess.run(["pkill", "-9", "-f", temp_dir], timeout=30)


_TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
worker = cluster.add_node(num_cpus=2, resources={"accelerator": 1})  # stands in for a GPU node
ray.init(address=cluster.address)
try:
    from jobs import batch_infer

    batch_infer.main(model=sys.argv[1], input=sys.argv[2], output=sys.argv[3], max_tokens=4, cpus_per_actor=0.5,
                     actor_resources=json.dumps({"accelerator": 1}))
    nodes = {a.node_id for a in list_actors(detail=True, limit=10000) if "Predictor" in (a.class_name or "")}
    print(json.dumps({"predictor_nodes": sorted(nodes), "worker": worker.node_id, "head": cluster.head_node.node_id}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.timeout(420)
def test_model_actors_run_on_the_node_with_the_accelerator(tmp_path, tiny_causal_dir):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _TWO_NODES, str(tiny_causal_dir), str(_prompts(tmp_path)), str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    placed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert placed["predictor_nodes"] == [placed["worker"]] and placed["worker"] != placed["head"]
    assert sorted(r["row_index"] for r in pq.read_table(out).to_pylist()) == list(range(6))
