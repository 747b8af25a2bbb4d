import subprocess
import sys
from pathlib import Path

import pytest

from compress import artifact, models

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_compress_job_writes_a_measured_artifact_and_prints_the_table(tiny_causal, tmp_path, wikitext):
    model, tokenizer, _ = tiny_causal
    src = artifact.save(model, tokenizer, tmp_path / "tiny")  # any loadable folder works as --model
    out = tmp_path / "tiny-int8"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.compress", "--model", str(src), "--spec", "int8", "--out", str(out),
         "--eval-data", str(wikitext), "--seq-len", "64", "--eval-blocks", "2", "--no-speed"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top1_agreement" in proc.stdout and "artifact_bytes" in proc.stdout
    manifest = artifact.verify(out)
    assert manifest["spec"] == "int8"
    assert manifest["metrics"]["artifact_bytes"] == artifact.weights_bytes(out)
    assert 0 < manifest["metrics"]["top1_agreement"] <= 1
    assert models.load(out).model.model.layers[0].mlp.up_proj.qweight.dtype.is_floating_point is False


def test_compress_job_rejects_a_bad_spec_before_loading():
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.compress", "--spec", "int7", "--out", "/nonexistent/x"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "unknown step 'int7'" in proc.stderr
