"""GGUF export, read back by independent readers: gguf-py's dequantizers for the blocks, Hugging Face transformers'
GGUF loader for the whole model and its tokenizer. (llama.cpp itself: bench/gguf_export.py.)"""

import copy

import gguf
import numpy as np
import pytest
import torch

from compress import artifact, gguf_export, kernels, qmodules, specs
from jobs import export

TEXT = "Hello world! Ünïcode café, numbers 12345, code: def f(x): return x**2\n\n  indented"
# (spec, float type of the export) -> the GGML type of the layers; norms are F32 in every one. distill-L1: a student
# with fewer layers, a plain float Llama
EXPECTED = {("int8", "f32"): "Q8_0", ("int4-g32", "f32"): "Q4_1", ("int4s-g64", "f32"): "Q4_0",
            ("distill-L1", "f16"): "F16"}


@pytest.mark.parametrize("spec,gguf_float", list(EXPECTED))
def test_an_export_loads_in_transformers_with_the_variants_logits_and_tokens(spec, gguf_float, tiny_causal,
                                                                            tmp_path, quick_spec, float_int4_products):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = copy.deepcopy(tiny_causal.model)
    with torch.no_grad():  # sharper attention than a random init has: the order of q and k rows must matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    blocks = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
    specs.apply_(model, quick_spec(spec), blocks=blocks)
    saved = artifact.save(model, tiny_causal.tokenizer, tmp_path / "a", {"spec": spec, "base_model": {"id": "tiny"}})
    out = export.export(str(saved), tmp_path / "gguf", "gguf", gguf_float)
    (file,) = out.glob("*.gguf")
    assert file.name == f"tiny-{spec}.gguf"
    reader = gguf.GGUFReader(str(file))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == EXPECTED[spec, gguf_float]
    assert kinds["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in kinds  # tied: llama.cpp reuses
    assert ("blk.1.attn_q.weight" in kinds) == (spec != "distill-L1")
    ids = torch.tensor([tiny_causal.tokenizer(TEXT)["input_ids"]])
    theirs = AutoModelForCausalLM.from_pretrained(out, gguf_file=file.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        diff = (torch.log_softmax(model(ids).logits, -1) - torch.log_softmax(theirs(ids).logits, -1)).abs().max()
    print(f"{spec} ({gguf_float}): max |d log p| raypress vs transformers reading the GGUF {diff:.2e}")
    assert diff < 5e-3  # scales (and F16 weights) are float16 in GGUF
    if spec != "int8":
        return  # the tokenizer is the same in every export; converting it back takes a while
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=file.name)
    assert tokenizer(TEXT)["input_ids"] == tiny_causal.tokenizer(TEXT)["input_ids"]
    assert tokenizer.chat_template == tiny_causal.tokenizer.chat_template


def test_blocks_hold_raypress_grids_exactly_up_to_float16_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    q, scale = qmodules.quantize_per_channel(w)
    got = gguf.quants.dequantize(gguf_export.q8_0(q, scale), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(got, (q.float() * scale.half().float()[:, None]).numpy())
    Q41, Q40 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_0
    for grid, kind in (("zero_point", Q41), ("min", Q41), ("symmetric", Q40)):
        q, scale, offset = qmodules.quantize_groupwise(w, 64, grid=grid)
        symmetric = qmodules.is_symmetric(scale, offset)
        assert symmetric == (grid == "symmetric")
        got = gguf.quants.dequantize(gguf_export.q4(q, scale, offset, 64, symmetric), kind)
        want = kernels.dequantize_groupwise(q, scale.half().float(), offset.half().float(), 64)
        if symmetric:  # Q4_0 stores d alone: the offset is -8 d
            want = kernels.dequantize_groupwise(q, scale.half().float(), -8 * scale.half().float(), 64)
        assert np.allclose(got, want.numpy(), rtol=0, atol=1e-6), grid


def test_models_gguf_cannot_hold_are_refused(minilm_loaded, tmp_path):
    with pytest.raises(gguf_export.ExportError, match="Llama-family"):
        gguf_export.write(minilm_loaded.model, minilm_loaded.tokenizer, tmp_path / "m.gguf", "minilm")
