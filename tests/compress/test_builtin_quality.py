"""The methods on the real built-in models, with the quality, size and round-trip bars of the compression issue.

Eval text: the first half of ../shared/data/wikitext2-valid.txt; calibration: the second half. smollm2-135m ships
as a 4-bit GGUF (Q4_1), so its "base" is that checkpoint dequantized to float32.
"""

import copy

import pytest
import torch

from compress import artifact, data, distill, evaluate, models, specs

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def smol(smollm2_loaded, wikitext_texts):
    model, tokenizer, _ = smollm2_loaded
    half = len(wikitext_texts) // 2
    eval_blocks = data.token_blocks(tokenizer, wikitext_texts[:half], 256, 8)
    calib = data.token_blocks(tokenizer, wikitext_texts[half:], 256, 16)
    with torch.inference_mode():
        ref = evaluate.causal_reference(model, tokenizer, eval_blocks, greedy_tokens=8)
    cache = {}

    def variant(spec: str):
        if spec not in cache:
            v = copy.deepcopy(model)
            specs.apply_(v, spec, blocks=calib)
            with torch.inference_mode():
                cache[spec] = (v, evaluate.causal_quality(v, tokenizer, ref))
        return cache[spec]

    return model, tokenizer, ref, variant, calib


def test_int8_keeps_perplexity_within_1pct_and_top1_agreement_above_95pct(smol):
    _, _, ref, variant, _ = smol
    q = variant("int8")[1]
    print(f"int8: ppl {ref.ppl:.3f} -> {q['ppl']:.3f}, top-1 agreement {q['top1_agreement']:.4f}")
    assert q["ppl"] <= 1.01 * ref.ppl and q["top1_agreement"] >= 0.95


def test_int8_dynamic_keeps_perplexity_within_5pct(smol):
    _, _, ref, variant, _ = smol
    q = variant("int8-dynamic")[1]
    print(f"int8-dynamic: ppl {ref.ppl:.3f} -> {q['ppl']:.3f}")
    assert q["ppl"] <= 1.05 * ref.ppl


def test_gptq_beats_round_to_nearest_int4(smol):
    """On the int4m grid (each group offset by its float minimum), the grid of the Q4_1 file SmolLM2 ships as.
    On the integer-zero-point grid GPTQ wins by less on this model (perplexity 40.4 against 41.5 at g128), whose
    weights sit on Q4_1's blocks of 32; on MiniLM, which had no prior quantization, it wins on both grids (cosine
    0.966 against 0.956 at g64), and tests/compress/test_gptq.py checks each layer's error on random weights."""
    _, _, _, variant, _ = smol
    gptq, rtn = variant("gptq-int4m-g128")[1]["ppl"], variant("int4m-g128")[1]["ppl"]
    print(f"int4m-g128 ppl {rtn:.3f}, gptq-int4m-g128 ppl {gptq:.3f}")
    assert gptq <= 0.8 * rtn  # measured 35.6 against 51.2: error feedback must win by a clear margin


def test_wanda_beats_magnitude_pruning(smol):
    _, _, ref, variant, _ = smol
    wanda, magnitude = variant("wanda-50%")[1]["ppl"], variant("prune-50%")[1]["ppl"]
    print(f"base ppl {ref.ppl:.3f}, prune-50% ppl {magnitude:.3f}, wanda-50% ppl {wanda:.3f}")
    # measured 50.4 against 477 (base 26.2): half the weights gone by activation-aware scores stays usable, by
    # magnitude alone it does not, and each bound fails the other method
    assert wanda <= 2.5 * ref.ppl < magnitude and wanda <= 0.25 * magnitude


def test_artifact_sizes_and_bit_identical_reloads(smol, tmp_path):
    model, tokenizer, _, variant, _ = smol
    sizes = {"base": artifact.weights_bytes(artifact.save(model, tokenizer, tmp_path / "base"))}
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    # (the int4 variants the GPTQ test made: int4m is the same format as int4, with float offsets)
    for spec in ["int8", "int8-dynamic", "int4m-g128", "gptq-int4m-g128", "wanda-50%", "prune-2:4+int8", "bf16",
                 "wanda-2:4"]:
        if spec == "bf16":  # no quality pass: bf16 matmuls crawl on CPUs without bf16 units
            v = copy.deepcopy(model)
            specs.apply_(v, spec)
        else:
            v = variant(spec)[0]
        path = artifact.save(v, tokenizer, tmp_path / spec, {"spec": spec})
        sizes[spec] = artifact.weights_bytes(path)
        loaded = models.load(path).model
        with torch.inference_mode():
            assert torch.equal(v(ids).logits, loaded(ids).logits), spec
        del loaded
    ratios = {k: round(v / sizes["base"], 3) for k, v in sizes.items()}
    print("artifact bytes / float32:", ratios)
    assert ratios["int8"] <= 0.30 and ratios["int4m-g128"] <= 0.20
    assert sizes["prune-2:4+int8"] < sizes["int8"] and sizes["wanda-50%"] < sizes["base"]


def test_distilled_student_is_closer_to_its_teacher_on_text_it_never_saw(smol, tmp_path):
    """Measured apart from the loss distillation reports about itself: KL to the teacher on the evaluation blocks
    (the first half of the text; training used the second), against the same cut student untrained."""
    model, tokenizer, ref, _, calib = smol
    blocks = calib.reshape(-1, 128)  # shorter blocks: cheaper steps on 2 cores
    untrained, student = copy.deepcopy(model), copy.deepcopy(model)
    distill.distill_(untrained, distill.DistillConfig(layers=15, tokens=0), blocks=blocks)
    report = distill.distill_(student, distill.DistillConfig(layers=15, tokens=4096), blocks=blocks)
    before = evaluate.causal_quality(untrained, tokenizer, ref)["kl_to_base"]
    after = evaluate.causal_quality(student, tokenizer, ref)["kl_to_base"]
    print(f"distill-L15: {report}; held-out KL to the teacher {before:.3f} -> {after:.3f}")
    assert student.config.num_hidden_layers == 15
    assert after <= 0.7 * before
    loaded = models.load(artifact.save(student, tokenizer, tmp_path / "student", {"spec": "distill-L15"})).model
    ids = blocks[:1, :32]
    with torch.inference_mode():
        assert torch.equal(student(ids).logits, loaded(ids).logits)


@pytest.fixture(scope="module")
def mini(minilm_loaded, wikitext_texts):
    model, tokenizer, _ = minilm_loaded
    sentences = [s for t in wikitext_texts for s in t.split(" . ") if len(s) > 30][:200]
    calib = data.token_blocks(tokenizer, sentences[100:], 64, 16)
    return model, tokenizer, evaluate.encoder_reference(model, tokenizer, sentences[:100]), calib


def test_minilm_int8_dynamic_keeps_cosine_above_099(mini):
    model, tokenizer, ref, _ = mini
    v = copy.deepcopy(model)
    specs.apply_(v, "int8-dynamic")
    q = evaluate.encoder_quality(v, tokenizer, ref)
    print("minilm int8-dynamic:", q)
    assert q["cosine_to_base"] >= 0.99 and q["neighbour_overlap"] >= 0.8


# Measured on 100 wikitext sentences: int8 0.9994, int4-g32 0.973, gptq-int4-g64 0.979, prune-2:4+int8 0.571,
# wanda-50% 0.858, distill-L3 (2048 tokens of training) 0.709, bf16 0.99996.
MINILM_MIN_COSINE = {"int8": 0.99, "int4-g32": 0.95, "gptq-int4-g64": 0.95, "prune-2:4+int8": 0.5,
                     "wanda-50%": 0.8, "distill-L3": 0.6, "bf16": 0.999}


@pytest.mark.parametrize("spec", list(MINILM_MIN_COSINE))
def test_every_method_runs_on_minilm_and_reloads_bit_identically(mini, tmp_path, spec):
    model, tokenizer, ref, calib = mini
    v = copy.deepcopy(model)
    parsed = specs.parse(spec)
    if spec.startswith("distill"):
        parsed = specs.Spec((distill.DistillConfig(layers=3, tokens=2048),))
    specs.apply_(v, parsed, blocks=calib)
    q = evaluate.encoder_quality(v, tokenizer, ref)
    print(spec, q)
    assert q["cosine_to_base"] >= MINILM_MIN_COSINE[spec], q
    loaded, tok, _ = models.load(artifact.save(v, tokenizer, tmp_path / "a", {"spec": str(parsed)}))
    texts = ref.texts[:8]
    assert torch.equal(models.encode(v, tokenizer, texts), models.encode(loaded, tok, texts))
