"""Shared fixtures: the built-in models (loaded once), tiny random models, one local Ray per test session."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from compress import models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dirs() -> list[Path]:
    """Where the shared test data may be: $RAYPRESS_SHARED_DATA, ../shared/data beside this checkout, or beside the
    checkout this one was cloned from (a fresh clone in a temporary folder)."""
    dirs = [Path(os.environ["RAYPRESS_SHARED_DATA"])] if os.environ.get("RAYPRESS_SHARED_DATA") else []
    dirs.append(ROOT.parent / "shared" / "data")
    try:
        origin = subprocess.run(
            ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and Path(origin).is_dir():
        dirs.append(Path(origin).resolve().parent / "shared" / "data")
    return dirs


@pytest.fixture(scope="session")
def wikitext() -> Path:
    for d in shared_data_dirs():
        if (d / "wikitext2-valid.txt").exists():
            return d / "wikitext2-valid.txt"
    raise FileNotFoundError(f"wikitext2-valid.txt not found in any of {[str(d) for d in shared_data_dirs()]}")


@pytest.fixture(scope="session")
def wikitext_texts(wikitext) -> list[str]:
    from compress.data import read_texts

    return read_texts(wikitext)


@pytest.fixture(scope="session")
def smollm2_loaded() -> models.LoadedModel:
    return models.load("smollm2-135m")


@pytest.fixture
def smollm2(smollm2_loaded) -> models.LoadedModel:
    """A fresh copy per test, so a test may compress it in place."""
    m, tok, kind = smollm2_loaded
    return models.LoadedModel(copy.deepcopy(m), tok, kind)


@pytest.fixture(scope="session")
def minilm_loaded() -> models.LoadedModel:
    return models.load("minilm-l6")


@pytest.fixture
def minilm(minilm_loaded) -> models.LoadedModel:
    m, tok, kind = minilm_loaded
    return models.LoadedModel(copy.deepcopy(m), tok, kind)


def tiny_llama(tokenizer, layers: int = 2, hidden: int = 64, tie: bool = True, seed: int = 0):
    """A random float32 Llama with the built-in tokenizer's vocabulary: fast stand-in for method tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).eval()


def tiny_bert(tokenizer, layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=512,
    )
    config.architectures = ["BertModel"]
    model = BertModel(config).eval()
    model.config.raypress_pooling = {"mode": "mean", "normalize": True}
    return model


@pytest.fixture
def make_tiny_llama(smollm2_loaded):
    """Build a random Llama with other sizes: make_tiny_llama(layers=3, hidden=64)."""
    return lambda **kw: tiny_llama(smollm2_loaded.tokenizer, **kw)


@pytest.fixture
def float_int4_products(monkeypatch):
    """int4 layers on float products at every size, for tests that compare weights (an export read back by another
    loader) rather than arithmetic: raypress's int4 kernel rounds the activations to 8 bits per block of 32, as
    llama.cpp does (tests/compress/test_kernels.py checks that arithmetic), which a float loader does not."""
    from compress import kernels

    monkeypatch.setattr(kernels, "MAX_INT4_KERNEL_ROWS", 0)


@pytest.fixture
def quick_spec():
    """quick_spec("distill-L1") -> the spec with distillation trained on 512 tokens instead of its default budget:
    for tests of what a variant is (its layout, its export, its reload), which the training length does not change."""
    import dataclasses

    from compress import distill, specs

    def make(spec: str):
        steps = specs.parse(spec).steps
        return specs.Spec(tuple(dataclasses.replace(s, tokens=512) if isinstance(s, distill.DistillConfig) else s
                                for s in steps))

    return make


@pytest.fixture
def package_checkpoint():
    """Write a model as llm-compressor writes round-to-nearest, with the compressed-tensors package's own scheme,
    qparams and compressor: package_checkpoint(model, tokenizer, weights, activations, path, ids) (see below)."""
    return _package_checkpoint


def _package_checkpoint(model, tokenizer, weights, activations, path, ids=None):
    """What llm-compressor writes for round-to-nearest: the package's own scheme, qparams and compressor. Returns
    the log-probs of the package's own (fake-quantized) forward on ``ids`` (token ids [1, T]), before compression."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.detach()
            if weights.strategy == "group":
                w = w.view(w.shape[0], -1, weights.group_size)
                lo, hi = w.amin(-1), w.amax(-1)
            else:
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            scale, zero = calculate_qparams(lo, hi, weights)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    with torch.inference_mode():
        reference = torch.log_softmax(model(ids).logits.float(), -1) if ids is not None else None
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    tokenizer.save_pretrained(path)
    return reference


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory, smollm2_loaded) -> Path:
    """A tiny random Llama saved once as an artifact: a fast model for job and serving tests."""
    from compress import artifact

    return artifact.save(tiny_llama(smollm2_loaded.tokenizer), smollm2_loaded.tokenizer,
                         tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def tiny_causal(smollm2_loaded) -> models.LoadedModel:
    return models.LoadedModel(tiny_llama(smollm2_loaded.tokenizer), smollm2_loaded.tokenizer, models.CAUSAL)


@pytest.fixture
def tiny_encoder(minilm_loaded) -> models.LoadedModel:
    return models.LoadedModel(tiny_bert(minilm_loaded.tokenizer), minilm_loaded.tokenizer, models.ENCODER)


class RayHeads:
    """`ray start --head` clusters of a test's own, each in a process session of its own, and stopped by that
    session: Ray's agents rename themselves (ray::DashboardAgent), so no command line names their cluster, and a
    pattern match leaves them running, holding ports and slowing every cluster started after them."""

    def start(self, args: list[str], env: dict, timeout: float = 180) -> int:
        """Run ``ray start ARGS``; returns the id of the session that all the cluster's processes belong to."""
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, args, out, err)
        return proc.pid

    def stop(self, session: int) -> None:
        subprocess.run(["pkill", "-9", "-s", str(session)], timeout=30)


@pytest.fixture(scope="session")
def ray_heads() -> RayHeads:
    return RayHeads()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session, sized so 2 cores never deadlock (actors take fractional CPUs)."""
    import ray

    ray.init(
        num_cpus=4, include_dashboard=False, configure_logging=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()
