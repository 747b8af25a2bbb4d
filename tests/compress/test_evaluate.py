"""The quality measures at their fixed points: a model measured against itself agrees perfectly, and a changed model
does not."""

import copy

import pytest
import torch

from compress import data, evaluate


@pytest.fixture(scope="module")
def blocks(smollm2_loaded):
    return data.token_blocks(smollm2_loaded.tokenizer, list(data.BUILTIN_PROMPTS) * 4, 32, 3)


def test_a_causal_model_against_itself_has_kl_0_and_full_agreement(tiny_causal, blocks):
    model, tokenizer, _ = tiny_causal
    ref = evaluate.causal_reference(model, tokenizer, blocks, greedy_tokens=6)
    q = evaluate.causal_quality(model, tokenizer, ref)
    assert q["kl_to_base"] == pytest.approx(0.0, abs=1e-7)
    assert q["top1_agreement"] == 1.0 and q["greedy_agreement"] == 1.0
    assert q["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    changed = evaluate.causal_quality(other, tokenizer, ref)
    assert changed["kl_to_base"] > 1e-3 and changed["top1_agreement"] < 1.0 and changed["ppl"] != q["ppl"]


def test_an_encoder_against_itself_has_cosine_1_and_the_same_neighbours(tiny_encoder):
    model, tokenizer, _ = tiny_encoder
    texts = list(data.BUILTIN_PROMPTS)
    ref = evaluate.encoder_reference(model, tokenizer, texts)
    q = evaluate.encoder_quality(model, tokenizer, ref, k=3)
    assert q["cosine_to_base"] == pytest.approx(1.0, abs=1e-6) and q["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert q["neighbour_overlap"] == 1.0
    shuffled = evaluate.EncoderReference(texts, ref.embeddings.roll(1, dims=0))  # every text against another's
    assert evaluate.encoder_quality(model, tokenizer, shuffled, k=3)["cosine_to_base"] < 0.99
