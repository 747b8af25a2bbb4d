"""Channel scaling (compress.channel_scaling): the scaled model computes what it did; with outlier channels in its
activations, smooth-int8-dynamic's answers stay closer to float32's than int8-dynamic's, and AWQ's closer than
round-to-nearest int4's at the same grid and group."""

import copy

import pytest
import torch

from compress import channel_scaling, specs


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
    alphas = channel_scaling.smooth_(outlier_llama, blocks)
    assert len(alphas) == 4 * len(outlier_llama.model.layers)
    assert all(a in channel_scaling.ALPHAS for a in alphas.values())
    assert any(a > 0 for a in alphas.values())  # the outliers are worth moving
    torch.testing.assert_close(logits(outlier_llama, ids), before, rtol=1e-4, atol=1e-4)


def kl_of(model, spec, ids, blocks):
    """KL(float32 || variant) per token, and the notes the spec's steps wrote."""
    ref = logits(model, ids).log_softmax(-1)
    variant = copy.deepcopy(model)
    notes = specs.apply_(variant, spec, blocks=blocks)
    out = logits(variant, ids).log_softmax(-1)
    return float((ref.exp() * (ref - out)).sum(-1).mean()), notes


@pytest.mark.parametrize("plain, scaled", [("int8-dynamic", "smooth-int8-dynamic"), ("int4-g32", "awq-int4-g32"),
                                           ("int4s-g32", "awq-int4s-g32"), ("gptq-int4-g32", "awq-gptq-int4-g32")])
def test_scaled_variants_answer_closer_to_float32_than_their_plain_forms(outlier_llama, plain, scaled):
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(2))
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
    (kl_plain, _), (kl_scaled, notes) = (kl_of(outlier_llama, s, ids, blocks) for s in (plain, scaled))
    print(f"{plain} {kl_plain:.3g}, {scaled} {kl_scaled:.3g}, alphas {notes[scaled]['groups_by_alpha']}")
    assert sum(notes[scaled]["groups_by_alpha"].values()) == 4 * len(outlier_llama.model.layers)
    assert kl_scaled < 0.9 * kl_plain  # measured 0.36x (smooth), 0.70x, 0.74x, 0.82x (awq-gptq)


def test_an_architecture_without_llama_norms_is_refused_by_name(tiny_encoder):
    with pytest.raises(ValueError, match="Llama family"):
        specs.apply_(tiny_encoder.model, "smooth-int8-dynamic", blocks=torch.zeros(2, 8, dtype=torch.long))
