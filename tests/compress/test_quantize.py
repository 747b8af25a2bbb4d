"""Each quantization method on tiny random models: the modules changed, and the output error stays in bounds."""

import copy

import pytest
import torch

from compress import artifact, evaluate, models, qmodules, quantize, specs

IDS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


@pytest.mark.parametrize("spec,module,bound", [
    ("int8", qmodules.Int8WeightOnlyLinear, 0.02),
    ("int8-dynamic", qmodules.Int8DynamicLinear, 0.04),
    ("int4-g32", qmodules.Int4WeightOnlyLinear, 0.2),
    ("int4-g128", qmodules.Int4WeightOnlyLinear, 0.22),
    ("bf16", torch.nn.Linear, 0.02),
])
def test_quantized_causal_model_stays_close(tiny_causal, spec, module, bound):
    model = tiny_causal.model
    ref = copy.deepcopy(model)
    specs.apply_(model, spec)
    mlp = model.model.layers[0].mlp.up_proj
    assert isinstance(mlp, module)
    if spec != "bf16":
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules()), "every linear layer is quantized"
        assert evaluate.memory_bytes(model) < evaluate.memory_bytes(ref) / 2.5
    err = rel_err(logits(model), logits(ref))
    assert 0 < err < bound, err


@pytest.mark.parametrize("spec,bound", [("int8", 0.01), ("int8-dynamic", 0.03), ("int4-g64", 0.12)])
def test_quantized_encoder_stays_close(tiny_encoder, spec, bound):
    model, tokenizer, _ = tiny_encoder
    texts = ["a first sentence", "the second one is a little longer than the first"]
    ref = models.encode(model, tokenizer, texts)
    specs.apply_(model, spec)
    quantized = (qmodules.Int8WeightOnlyLinear, qmodules.Int4WeightOnlyLinear)
    assert isinstance(model.encoder.layer[0].intermediate.dense, quantized)
    assert not isinstance(model.embeddings.word_embeddings, torch.nn.Embedding)
    cos = torch.nn.functional.cosine_similarity(models.encode(model, tokenizer, texts), ref).min().item()
    assert 1 - bound < cos < 1.0


def test_tied_head_shares_the_quantized_table(tiny_causal):
    model = tiny_causal.model
    specs.apply_(model, "int4-g64")
    assert isinstance(model.model.embed_tokens, qmodules.Int4Embedding)
    assert model.lm_head.packed is model.model.embed_tokens.packed


def test_groupwise_quantization_handles_a_partial_last_group():
    w = torch.randn(8, 576)
    q, scale, offset = qmodules.quantize_groupwise(w, 128)
    assert scale.shape == (8, 5) and q.max() <= 15
    from compress.kernels import dequantize_int4, pack_int4

    err = (dequantize_int4(pack_int4(q), scale, offset, 128) - w).abs().max()
    assert err <= scale.max() / 2 + 1e-6  # round to nearest: at most half a step


@pytest.mark.parametrize("grid", list(quantize.INT4_GRIDS))
def test_each_int4_grid_rounds_to_nearest_and_says_whether_integer_zero_points_hold_it(grid):
    from compress.kernels import dequantize_groupwise

    w = torch.randn(16, 128) + torch.linspace(-0.5, 0.5, 128)  # groups skewed one way or the other
    q, scale, offset = qmodules.quantize_groupwise(w, 32, grid=grid)
    assert (dequantize_groupwise(q, scale, offset, 32) - w).abs().max() <= scale.max() / 2 + 1e-6
    zp = qmodules.zero_points(scale, offset)
    if grid == "min":  # offset = the float minimum: no integer zero point holds it
        assert zp is None and not qmodules.is_symmetric(scale, offset)
        return
    assert zp is not None and torch.allclose(-zp * scale, offset)
    assert qmodules.is_symmetric(scale, offset) == (grid == "symmetric")
    if grid == "zero_point":  # asymmetric: the zero points follow the groups' skew, and 0 is on the grid
        assert len(zp.unique()) > 1
        assert torch.equal(dequantize_groupwise(zp.repeat_interleave(32, 1), scale, offset, 32), torch.zeros(16, 128))


ALL_SPECS = ["base", "bf16", "fp16", "int8", "int8-dynamic", "smooth-int8-dynamic", "int4-g32", "int4-g128",
             "gptq-int4-g128", "prune-50%", "prune-2:4", "wanda-50%", "wanda-2:4", "distill-L1", "prune-2:4+int8",
             "wanda-2:4+int4-g64", "awq-int4-g32", "awq-gptq-int4s-g32"]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_method_on_a_random_model_reloads_bit_identically(tiny_causal, tmp_path, spec, quick_spec):
    model, tokenizer, _ = tiny_causal
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
    specs.apply_(model, quick_spec(spec), blocks=blocks)
    path = artifact.save(model, tokenizer, tmp_path / "a", {"spec": spec})
    loaded = models.load(path).model
    assert torch.equal(logits(model), logits(loaded))


@pytest.mark.parametrize("spec", ["int8", "int8-dynamic", "int4-g32", "gptq-int4-g64", "wanda-2:4", "distill-L1"])
def test_every_method_on_a_random_encoder_reloads_bit_identically(tiny_encoder, tmp_path, spec, quick_spec):
    model, tokenizer, _ = tiny_encoder
    blocks = torch.randint(1000, 2000, (8, 32), generator=torch.Generator().manual_seed(1))
    specs.apply_(model, quick_spec(spec), blocks=blocks)
    path = artifact.save(model, tokenizer, tmp_path / "a", {"spec": spec})
    loaded, tok, _ = models.load(path)
    texts = ["one", "two sentences here"]
    assert torch.equal(models.encode(model, tokenizer, texts), models.encode(loaded, tok, texts))


@pytest.mark.parametrize("spec", ["int8", "int4-g32"])
def test_a_bf16_model_stays_bf16_through_its_quantized_embedding(tiny_causal, spec):
    """On a GPU the model is bf16: the quantized table must hand the blocks bf16 rows, as nn.Embedding did."""
    model = tiny_causal.model.to(torch.bfloat16)
    specs.apply_(model, spec)
    ids = torch.tensor([[1, 2, 3]])
    assert model.get_input_embeddings()(ids).dtype == torch.bfloat16
    assert model(ids).logits.shape == (1, 3, model.config.vocab_size)  # the blocks take what the table gives
    model.float()
    assert model.get_input_embeddings()(ids).dtype == torch.float32  # and it follows model.to(dtype)
