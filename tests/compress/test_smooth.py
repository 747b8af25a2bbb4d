"""SmoothQuant (compress.smooth): the smoothed model computes what it did; with outlier channels in its activations,
smooth-int8-dynamic's answers stay closer to float32's than int8-dynamic's."""

import copy

import pytest
import torch

from compress import smooth, specs


@torch.inference_mode()
def logits(model, ids):
    return model(ids).logits.float()


@pytest.fixture
def outlier_llama(tiny_causal):
    """A random Llama (no prior quantization) whose norms make a few channels 30x the rest, as trained LLMs' do."""
    model = copy.deepcopy(tiny_causal.model)
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[:4] *= 30
    return model


def test_smoothing_keeps_the_float_function_and_reports_its_alphas(outlier_llama):
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
    before = logits(outlier_llama, ids)
    alphas = smooth.smooth_(outlier_llama, blocks)
    assert len(alphas) == 4 * len(outlier_llama.model.layers) and all(a in smooth.ALPHAS for a in alphas.values())
    assert any(a > 0 for a in alphas.values())  # the outliers are worth moving
    torch.testing.assert_close(logits(outlier_llama, ids), before, rtol=1e-4, atol=1e-4)


def test_smooth_int8_dynamic_answers_closer_to_float32_than_int8_dynamic(outlier_llama):
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(2))
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
    ref = logits(outlier_llama, ids).log_softmax(-1)
    kl = {}
    for spec in ("int8-dynamic", "smooth-int8-dynamic"):
        model = copy.deepcopy(outlier_llama)
        notes = specs.apply_(model, spec, blocks=blocks)
        out = logits(model, ids).log_softmax(-1)
        kl[spec] = float((ref.exp() * (ref - out)).sum(-1).mean())
        if spec.startswith("smooth"):
            assert sum(notes[spec]["groups_by_alpha"].values()) == 4 * len(model.model.layers)
    print(kl)
    assert kl["smooth-int8-dynamic"] < 0.7 * kl["int8-dynamic"]


def test_an_architecture_without_llama_norms_is_refused_by_name(tiny_encoder):
    with pytest.raises(ValueError, match="Llama family"):
        specs.apply_(tiny_encoder.model, "smooth-int8-dynamic", blocks=torch.zeros(2, 8, dtype=torch.long))
