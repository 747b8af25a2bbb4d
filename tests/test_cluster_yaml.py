"""cluster.yaml is valid for the Ray cluster launcher that ships with the installed ray."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types, "at least one worker type must offer GPUs"
    assert all(t["max_workers"] >= t["min_workers"] for t in types.values())
    assert any("make install" in c or "pip install" in c for c in config["setup_commands"])
