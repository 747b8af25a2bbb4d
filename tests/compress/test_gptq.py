import copy

import torch

from compress import calibrate, gptq, qmodules, specs
from compress.kernels import dequantize_int4, pack_int4


def test_gptq_reconstructs_layer_outputs_better_than_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(4096, 256) @ torch.randn(256, 256) * 0.1  # correlated inputs, as in real layers
    H = 2 * x.T @ x / len(x)
    errors = {}
    q, s, o = gptq.gptq_quantize(w, H, gptq.GPTQConfig(group_size=64))
    errors["gptq"] = (x @ (dequantize_int4(pack_int4(q), s, o, 64) - w).T).norm().item()
    q, s, o = qmodules.quantize_groupwise(w, 64)
    errors["rtn"] = (x @ (dequantize_int4(pack_int4(q), s, o, 64) - w).T).norm().item()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_on_a_random_model_uses_the_int4_format(tiny_causal):
    model = tiny_causal.model
    ref = copy.deepcopy(model)
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    specs.apply_(model, "gptq-int4-g32", blocks=blocks)
    assert isinstance(model.model.layers[0].self_attn.q_proj, qmodules.Int4WeightOnlyLinear)
    with torch.inference_mode():
        a, b = model(blocks[:2]).logits, ref(blocks[:2]).logits
    assert 0 < (a - b).norm() / b.norm() < 0.2


def test_block_by_block_feeds_each_block_what_the_model_changed_so_far_computes(tiny_causal):
    model = tiny_causal.model
    blocks = torch.randint(0, 1000, (6, 32), generator=torch.Generator().manual_seed(1))
    stack = calibrate.transformer_blocks(model)
    assert stack is model.model.layers
    float_model, expected_model = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        expected_model.model.layers[0].mlp.down_proj.weight.zero_()  # what the visit below does to block 0
    expected = calibrate.hessians(expected_model, blocks, calibrate.block_linears(expected_model))

    layers, got, visited = calibrate.block_linears(model), {}, []

    def visit(block, feed):
        names = {n: m for n, m in layers.items() if any(m is b for b in block.modules())}
        got.update(calibrate.hessians_of(names, lambda fn: feed(fn, names)))
        visited.append(block)
        if block is stack[0]:
            block.mlp.down_proj.weight.zero_()

    assert calibrate.block_by_block(model, blocks, visit)
    assert visited == list(stack)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name
    q1 = "model.layers.1.self_attn.q_proj"
    unchanged = calibrate.hessians(float_model, blocks, {q1: float_model.model.layers[1].self_attn.q_proj})
    assert not torch.allclose(got[q1], unchanged[q1], rtol=1e-3)  # block 1 saw block 0 as changed


def layer_problem(seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(64, 256)
    x = torch.randn(4096, 256) @ torch.randn(256, 256) * 0.1
    return w, x


def output_error(x, w, q, s, o, gs=64) -> float:
    return (x @ (dequantize_int4(pack_int4(q), s, o, gs) - w).T).norm().item()


def test_without_act_order_gptq_still_beats_rtn_and_stores_the_same_groups():
    w, x = layer_problem()
    H = 2 * x.T @ x / len(x)
    ordered = gptq.gptq_quantize(w, H, gptq.GPTQConfig(group_size=64))
    plain = gptq.gptq_quantize(w, H, gptq.GPTQConfig(group_size=64, act_order=False))
    rtn = output_error(x, w, *qmodules.quantize_groupwise(w, 64))
    assert output_error(x, w, *plain) < 0.8 * rtn
    assert not torch.equal(plain[0], ordered[0])  # the column order changed the rounding ...
    assert torch.equal(plain[1], ordered[1]) and torch.equal(plain[2], ordered[2])  # ... but not the groups


def test_inputs_never_seen_in_calibration_do_not_break_gptq():
    """Dead inputs (a zero H diagonal: a feature calibration never activated) would make H singular."""
    w, x = layer_problem(1)
    x[:, 10:20] = 0
    H = 2 * x.T @ x / len(x)
    q, s, o = gptq.gptq_quantize(w, H, gptq.GPTQConfig(group_size=64))
    assert torch.isfinite(s).all() and torch.isfinite(o).all() and int(q.max()) <= 15
    assert output_error(x, w, q, s, o) < 0.8 * output_error(x, w, *qmodules.quantize_groupwise(w, 64))
    # a layer whose input calibration never reached at all (H = 0): it still quantizes, to its static groups
    q, s, o = gptq.gptq_quantize(w, torch.zeros(256, 256), gptq.GPTQConfig(group_size=64))
    assert torch.isfinite(s).all() and int(q.max()) <= 15


def test_the_single_pass_variant_quantizes_every_layer_from_float_inputs(tiny_causal):
    model = tiny_causal.model
    ref, sequential = copy.deepcopy(model), copy.deepcopy(model)
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(2))
    gptq.gptq_(model, gptq.GPTQConfig(group_size=32, sequential=False), blocks=blocks)
    gptq.gptq_(sequential, gptq.GPTQConfig(group_size=32), blocks=blocks)
    layers = calibrate.block_linears(ref)
    assert all(isinstance(model.get_submodule(n), qmodules.Int4WeightOnlyLinear) for n in layers)
    last = "model.layers.1.mlp.down_proj"  # its Hessian differs: one pass saw float inputs, not quantized ones
    assert not torch.equal(model.get_submodule(last).packed, sequential.get_submodule(last).packed)
    with torch.inference_mode():
        a, b = model(blocks[:2]).logits, ref(blocks[:2]).logits
    assert 0 < (a - b).norm() / b.norm() < 0.2
