import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import artifact, models, specs


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


IDS = torch.tensor([[1, 20, 300, 4000, 5, 6, 70, 800]])


@pytest.mark.parametrize("spec", ["base", "int8", "bf16"])
def test_round_trip_gives_bit_identical_logits(tiny_causal, tmp_path, spec):
    model, tokenizer, _ = tiny_causal
    specs.apply_(model, spec)
    path = artifact.save(model, tokenizer, tmp_path / "a", {"spec": spec})
    loaded, tok2, kind = models.load(path)
    assert kind == models.CAUSAL
    assert torch.equal(_logits(model, IDS), _logits(loaded, IDS))
    assert tok2("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    manifest = json.loads((path / "raypress.json").read_text())
    assert manifest["spec"] == spec and set(manifest["files"]) >= {"model.safetensors", "config.json"}
    assert {"torch", "transformers", "raypress"} <= set(manifest["versions"])


def test_a_tied_float_head_is_the_tables_parameter_again_after_load(tiny_causal, tmp_path):
    model, tokenizer, _ = tiny_causal
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded = artifact.load(artifact.save(model, tokenizer, tmp_path / "a")).model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


PEAK = """
import re, sys
from transformers import LlamaForCausalLM  # noqa: F401  (imported before the baseline: not the load's memory)
import torch
from compress import artifact
def peak():  # VmHWM: this address space's peak resident memory (ru_maxrss would count the parent's, from fork)
    return int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = peak()
model = artifact.load(sys.argv[1]).model
with torch.inference_mode():
    model(torch.arange(1, 9)[None])  # every weight touched (they map the artifact's file until then)
print(peak() - before)
"""


def test_loading_an_int8_artifact_takes_about_its_bytes_on_disk_not_a_float_model(make_tiny_llama, tmp_path):
    """Loading and a first forward: the issue's bar is 1.5x the bytes on disk at 1.1B. The loader that built the
    model in float first and filled zeroed compressed tensors with copies of the saved ones peaked at 2.3x here."""
    model = make_tiny_llama(layers=8, hidden=1024, tie=False)  # ~200M parameters: 0.8 GB as float32
    specs.apply_(model, "int8")
    path = artifact.save(model, models.tokenizer_for("smollm2-135m")[0], tmp_path / "a", {"spec": "int8"})
    del model
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    peak, disk = int(out.stdout.split()[-1]), artifact.size_on_disk(path)
    assert peak <= 1.5 * disk, (peak / 1e6, disk / 1e6)


def test_tied_quantized_table_is_stored_once_and_retied_on_load(tiny_causal, tmp_path):
    model, tokenizer, _ = tiny_causal
    specs.apply_(model, "int8")
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    path = artifact.save(model, tokenizer, tmp_path / "a", {"spec": "int8"})
    loaded = artifact.load(path).model
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    table = model.model.embed_tokens.qweight
    assert artifact.weights_bytes(path) < evaluate_bytes(model) + table.numel() // 2  # the table is not written twice


def evaluate_bytes(model):
    from compress.evaluate import memory_bytes

    return memory_bytes(model)


def test_encoder_round_trip_keeps_pooling(tiny_encoder, tmp_path):
    model, tokenizer, _ = tiny_encoder
    path = artifact.save(model, tokenizer, tmp_path / "enc", {"spec": "base"})
    loaded, tok, kind = models.load(path)
    assert kind == models.ENCODER
    texts = ["one sentence", "another, longer sentence here"]
    assert torch.equal(models.encode(model, tokenizer, texts), models.encode(loaded, tok, texts))


def test_tampered_file_is_refused_naming_it(tiny_causal, tmp_path):
    model, tokenizer, _ = tiny_causal
    path = artifact.save(model, tokenizer, tmp_path / "a")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match="model.safetensors"):
        models.load(path)


def test_truncated_file_is_refused_naming_it(tiny_causal, tmp_path):
    model, tokenizer, _ = tiny_causal
    path = artifact.save(model, tokenizer, tmp_path / "a")
    (path / "config.json").write_text((path / "config.json").read_text()[:20])
    with pytest.raises(artifact.ArtifactError, match="config.json"):
        artifact.load(path)


def test_crash_while_writing_leaves_no_artifact_and_keeps_the_old_one(tiny_causal, tmp_path, monkeypatch):
    model, tokenizer, _ = tiny_causal
    out = tmp_path / "a"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        artifact.save(model, tokenizer, out)
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor a temporary folder

    monkeypatch.undo()
    artifact.save(model, tokenizer, out, {"spec": "base"})
    before = artifact.verify(out)["files"]
    monkeypatch.setattr(artifact, "save_file", crash)
    with pytest.raises(OSError):
        artifact.save(model, tokenizer, out, {"spec": "int8"})
    assert artifact.verify(out)["files"] == before and [p.name for p in tmp_path.iterdir()] == ["a"]


def test_mostly_zero_tensors_are_stored_as_mask_and_values(tiny_causal, tmp_path):
    model, tokenizer, _ = tiny_causal
    dense = artifact.weights_bytes(artifact.save(model, tokenizer, tmp_path / "dense"))
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.up_proj.weight
            w[w.abs() < w.abs().median()] = 0
    path = artifact.save(model, tokenizer, tmp_path / "sparse")
    assert artifact.weights_bytes(path) < dense
    assert "model.layers.0.mlp.up_proj.weight" in artifact.read_manifest(path)["sparse"]
    assert torch.equal(_logits(model, IDS), _logits(models.load(path).model, IDS))


def test_not_an_artifact(tmp_path):
    with pytest.raises(artifact.ArtifactError, match="not a raypress artifact"):
        artifact.verify(tmp_path)


def test_missing_files_and_damaged_or_foreign_manifests_are_refused(tiny_causal, tmp_path):
    model, tokenizer, _ = tiny_causal
    path = artifact.save(model, tokenizer, tmp_path / "a")
    (path / "tokenizer.json").unlink()
    with pytest.raises(artifact.ArtifactError, match="missing 'tokenizer.json'"):
        artifact.verify(path)
    manifest = path / models.MANIFEST
    for text, message in [("{not json", "not valid JSON"), ('{"format": "gguf"}', "format='gguf'"),
                          ("[1, 2]", "format='list'")]:
        manifest.write_text(text)
        with pytest.raises(artifact.ArtifactError, match=message):
            models.load(path)


def test_a_manifest_cannot_point_outside_the_artifact_or_name_any_dtype(tiny_causal, tmp_path):
    model, tokenizer, _ = tiny_causal
    path = artifact.save(model, tokenizer, tmp_path / "a")
    file = path / models.MANIFEST
    good = json.loads(file.read_text())
    for change, message in [({"files": {**good["files"], "/dev/zero": "0" * 64}}, "relative paths inside"),
                            ({"files": {**good["files"], "../secret": "0" * 64}}, "relative paths inside"),
                            ({"dtype": "Tensor"}, "dtype 'Tensor' is not one of"),
                            ({"kind": "rm -rf"}, "kind 'rm -rf'")]:
        file.write_text(json.dumps({**good, **change}))
        with pytest.raises(artifact.ArtifactError, match=message):
            models.load(path)
    file.write_text(json.dumps(good))
    loaded = models.load(path)  # the untouched manifest still loads
    assert loaded.model.config.raypress_manifest["spec"] == "base"  # what the server names the model after
    again = artifact.save(loaded.model, loaded.tokenizer, tmp_path / "again")
    assert "raypress_manifest" not in json.loads((again / "config.json").read_text())  # not carried into a re-save


def test_a_failed_or_killed_swap_of_the_two_folders_loses_no_artifact(tiny_causal, tmp_path, monkeypatch):
    """The old artifact is moved aside, then the new one moved in: a failure of the second rename puts the old one
    back; a process killed between the two leaves the old one aside, and loading names where it is."""
    import os

    model, tokenizer, _ = tiny_causal
    out = artifact.save(model, tokenizer, tmp_path / "a", {"spec": "base"})
    real, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("power cut")
        real(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError, match="power cut"):
        artifact.save(model, tokenizer, out, {"spec": "int8"})
    monkeypatch.undo()
    assert artifact.verify(out)["spec"] == "base" and [p.name for p in tmp_path.iterdir()] == ["a"]
    aside = tmp_path / ".a.old-killed"
    os.rename(out, aside)  # what a kill between the two renames leaves
    with pytest.raises(artifact.ArtifactError, match=r"interrupted.*\.a\.old-killed"):
        artifact.verify(out)
    with pytest.raises(FileNotFoundError, match=r"interrupted.*\.a\.old-killed"):  # what serve and jobs call
        models.load(out)


def test_a_float32_artifact_runs_in_bf16_on_a_gpu_and_as_saved_elsewhere():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # only the rule: no GPU is needed to check it
    assert artifact.load_dtype(torch.float32, None, gpu) == torch.bfloat16
    assert artifact.load_dtype(torch.float32, None, cpu) == torch.float32
    assert artifact.load_dtype(torch.bfloat16, None, cpu) == torch.bfloat16  # a bf16 variant stays one
    assert artifact.load_dtype(torch.float32, torch.float16, gpu) == torch.float16  # asked for: given
