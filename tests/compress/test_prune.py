import copy
import logging

import pytest
import torch

from compress import calibrate, prune, specs


def test_magnitude_pruning_zeroes_the_asked_fraction_and_keeps_the_largest(tiny_causal):
    model = tiny_causal.model
    ref = copy.deepcopy(model)
    specs.apply_(model, "prune-50%")
    assert abs(prune.sparsity(model) - 0.5) < 0.01
    w, w0 = model.model.layers[0].mlp.up_proj.weight, ref.model.layers[0].mlp.up_proj.weight
    assert w0[w == 0].abs().max() <= w0[w != 0].abs().min()
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)  # the head and embeddings are left alone


def test_two_of_four_keeps_two_in_every_group(tiny_causal):
    model = tiny_causal.model
    specs.apply_(model, "prune-2:4")
    for layer in calibrate.block_linears(model).values():
        groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all()
    assert abs(prune.sparsity(model) - 0.5) < 0.01


def test_wanda_keeps_weights_on_high_activation_channels_better_than_magnitude():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(4096, 128)
    x[:, :8] *= 20  # a few input channels carry large activations, as in LLMs
    norms = x.norm(dim=0)
    errors = {}
    for name, score in {"magnitude": w.abs(), "wanda": w.abs() * norms}.items():
        mask = prune.prune_mask(score, 0.5, None, per_row=(name == "wanda"))
        errors[name] = ((x @ (w * mask).T) - x @ w.T).norm().item()
    assert errors["wanda"] < 0.7 * errors["magnitude"], errors


def test_wanda_on_a_random_model_changes_weights_within_bounds(tiny_causal):
    model = tiny_causal.model
    ref = copy.deepcopy(model)
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    specs.apply_(model, "wanda-50%", blocks=blocks)
    assert abs(prune.sparsity(model) - 0.5) < 0.01
    with torch.inference_mode():
        a, b = model(blocks[:2]).logits, ref(blocks[:2]).logits
    assert 0 < (a - b).norm() / b.norm() < 0.6


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the conversion itself is tested below")
def test_2to4_detection_and_sparse_kernels_stay_off_where_the_hardware_lacks_them(tiny_causal, caplog):
    model = tiny_causal.model
    dense_up = model.model.layers[0].mlp.up_proj.weight.clone()
    specs.apply_(model, "prune-2:4")
    layers = calibrate.block_linears(model)
    assert all(prune.is_2to4(m.weight) for m in layers.values())
    assert not prune.is_2to4(dense_up)
    with caplog.at_level(logging.INFO, logger="compress.prune"):
        assert prune.semi_structured_(model) == 0  # this machine has no GPU: the weights stay dense, and it says why
    assert "compute capability 8.0+" in caplog.text
    assert all(type(m.weight) is torch.nn.Parameter for m in layers.values())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse kernels need a CUDA GPU of compute capability 8.0+")
def test_2to4_weights_go_to_the_sparse_kernels_on_a_gpu(make_tiny_llama):
    model = make_tiny_llama(hidden=128).to("cuda", torch.float16)  # kernel shapes: multiples of 32 x 64
    specs.apply_(model, "prune-2:4")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    with torch.inference_mode():
        dense = model(ids).logits
        converted = prune.semi_structured_(model)
        sparse = model(ids).logits
    layers = calibrate.block_linears(model)
    assert converted == len(layers) > 0
    assert all(type(m.weight.data).__name__.startswith("SparseSemiStructured") for m in layers.values())
    assert torch.allclose(sparse.float(), dense.float(), rtol=5e-2, atol=5e-2)
