import copy

import torch

from compress import gptq, quantize, specs
from compress.kernels import dequantize_int4, pack_int4


def test_gptq_reconstructs_layer_outputs_better_than_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(4096, 256) @ torch.randn(256, 256) * 0.1  # correlated inputs, as in real layers
    H = 2 * x.T @ x / len(x)
    errors = {}
    q, s, o = gptq.gptq_quantize(w, H, gptq.GPTQConfig(group_size=64))
    errors["gptq"] = (x @ (dequantize_int4(pack_int4(q), s, o, 64) - w).T).norm().item()
    q, s, o = quantize.quantize_groupwise(w, 64)
    errors["rtn"] = (x @ (dequantize_int4(pack_int4(q), s, o, 64) - w).T).norm().item()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_on_a_random_model_uses_the_int4_format(tiny_causal):
    model = tiny_causal.model
    ref = copy.deepcopy(model)
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    specs.apply_(model, "gptq-int4-g32", blocks=blocks)
    assert isinstance(model.model.layers[0].self_attn.q_proj, quantize.Int4WeightOnlyLinear)
    with torch.inference_mode():
        a, b = model(blocks[:2]).logits, ref(blocks[:2]).logits
    assert 0 < (a - b).norm() / b.norm() < 0.2
