"""Mixed precision (compress.sensitivity, compress.mixed): the predicted cost of each layer's rounding ranks layers
and formats as their measured KL does; the chosen mix keeps to its size limit and spends bits where they matter; the
artifact reloads bit-identically and exports to compressed-tensors (config groups per layer) and GGUF (a type per
tensor) that other loaders read. On random Llamas: no prior quantization anywhere."""

import copy
import json

import gguf
import pytest
import torch

from compress import artifact, ctensors, mixed, models, qmodules, sensitivity, specs
from jobs import export


@torch.inference_mode()
def log_probs(model, ids):
    return model(ids).logits.float().log_softmax(-1)


def kl(ref, out) -> float:
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def ranks(values) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().float()


@pytest.fixture
def outlier_llama(tiny_causal):
    """A random Llama whose norms make a few channels 30x the rest (as trained LLMs' do): layers then differ
    widely in what rounding costs them."""
    model = copy.deepcopy(tiny_causal.model)
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[:4] *= 30
    return model


BLOCKS = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(2))


def test_predicted_cost_ranks_layers_and_formats_as_their_measured_kl(outlier_llama):
    table = sensitivity.measure(outlier_llama, BLOCKS, sensitivity.FORMATS + (sensitivity.INT8_DYNAMIC,))
    assert table.tokens == BLOCKS.numel() and set(table.scores) == set(sensitivity.layers(outlier_llama))
    assert "lm_head" not in table.scores  # tied: its error is the embedding's
    ref = log_probs(outlier_llama, IDS)
    predicted, measured = [], []
    for name, by_format in table.scores.items():
        assert by_format[sensitivity.FLOAT] == 0
        assert ("int8-dynamic" in by_format) == ("embed" not in name)  # a table's lookups have no activations
        for fmt in ("int8", "int8-dynamic", "int4-g32", "int4s-g64", "int4m-g32")[: len(by_format)]:
            if fmt not in by_format:
                continue
            variant = copy.deepcopy(outlier_llama)
            mixed.swap_(variant, {name: fmt})
            predicted.append(by_format[fmt])
            measured.append(kl(ref, log_probs(variant, IDS)))
    spearman = float(torch.corrcoef(torch.stack([ranks(predicted), ranks(measured)]))[0, 1])
    print(f"{len(predicted)} (layer, format) pairs: Spearman {spearman:.3f} predicted vs measured KL")
    assert spearman > 0.85  # measured 0.978 (held-out text, other draws than the calibration's)


def test_the_solver_keeps_to_its_limit_and_gives_bits_to_the_layers_that_need_them():
    table = sensitivity.Table()
    for name, cost in (("calm", 1e-4), ("touchy", 1.0)):  # two layers of one size, one 10^4 times as sensitive
        table.bytes[name] = {f: sensitivity.stored_bytes(f, 256, 256) for f in sensitivity.FORMATS}
        table.scores[name] = {f: 0.0 if f == "float" else cost * (0.01 if f == "int8" else 1)
                              for f in table.bytes[name]}
    weights = 2 * 256 * 256
    for bits in (4.6, 6.4, 12, 21):
        plan = mixed.solve(table, bits)
        stored = sum(table.bytes[n][f] for n, f in plan.items())
        assert 8 * stored / weights <= bits
        print(bits, plan)
    assert mixed.solve(table, 4.6) == {"calm": "int4-g128", "touchy": "int4-g128"}  # 4.5 bits: the smallest
    assert mixed.solve(table, 6.4) == {"calm": "int4-g128", "touchy": "int8"}
    assert mixed.solve(table, 21) == {"calm": "int8", "touchy": "float"}  # float where it saves the most per byte
    with pytest.raises(ValueError, match="smallest formats store 6.00 bits a weight"):
        mixed.solve(_only(table, "int4-g32"), 5)


def _only(table, fmt):
    out = sensitivity.Table()
    out.bytes = table.bytes
    out.scores = {n: {fmt: s[fmt]} for n, s in table.scores.items()}
    return out


@pytest.mark.parametrize("spec", ["mixed-5bit", "mixed-int4s-6bit"])
def test_a_mixed_variant_keeps_its_limit_and_reloads_bit_identically(spec, outlier_llama, tiny_causal, tmp_path):
    model = copy.deepcopy(outlier_llama)
    ref = log_probs(model, IDS)
    notes = specs.apply_(model, spec, blocks=BLOCKS)[spec]
    assert notes["bits"] <= float(spec.split("-")[-1][:-3]) and sum(notes["formats"].values()) == len(notes["layers"])
    for block in range(len(model.model.layers)):  # what the engines fuse into one product shares one format
        prefix = f"model.layers.{block}."
        assert len({notes["layers"][prefix + f"self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert notes["layers"][prefix + "mlp.gate_proj"] == notes["layers"][prefix + "mlp.up_proj"]
    if "int4s" in spec:
        assert not any(f.startswith("int4") and not f.startswith("int4s") for f in notes["layers"].values())
    out = log_probs(model, IDS)
    print(f"{spec}: {notes['bits']} bits, formats {notes['formats']}, predicted KL {notes['predicted_kl']:.3g}, "
          f"measured {kl(ref, out):.3g}")
    assert kl(ref, out) < 3 * notes["predicted_kl"] + 1e-4
    saved = artifact.save(model, tiny_causal.tokenizer, tmp_path / "a", {"spec": spec})
    manifest = json.loads((saved / "raypress.json").read_text())
    assert manifest["layers"] == mixed.module_formats(model) == notes["layers"]
    back = artifact.load(saved, device="cpu")[0]
    assert mixed.module_formats(back) == manifest["layers"]
    torch.testing.assert_close(log_probs(back, IDS), out, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["int8-dynamic-70", "smooth-int8-dynamic-90"])
def test_a_dynamic_mix_keeps_float_activations_where_rounding_them_costs_most(spec, outlier_llama, tiny_causal,
                                                                               tmp_path):
    ref = log_probs(outlier_llama, IDS)
    everywhere = copy.deepcopy(outlier_llama)
    specs.apply_(everywhere, "int8-dynamic")
    model = copy.deepcopy(outlier_llama)
    notes = specs.apply_(model, spec, blocks=BLOCKS)[spec]
    share = int(spec.rsplit("-", 1)[1]) / 100
    assert share <= notes["dynamic_share"] < 1 and set(notes["formats"]) == {"int8", "int8-dynamic"}
    assert "embed" not in "".join(n for n, f in notes["layers"].items() if f == "int8-dynamic")
    for block in range(len(model.model.layers)):
        prefix = f"model.layers.{block}."
        assert len({notes["layers"][prefix + f"self_attn.{p}_proj"] for p in "qkv"}) == 1
    # the unit where int8 activations cost most per multiply-add keeps float ones (where it fits in the rest)
    by = notes["sensitivity"]
    macs = {n: m.in_features * m.out_features for n, m in outlier_llama.named_modules()
            if isinstance(m, torch.nn.Linear) and "int8-dynamic" in by.get(n, {})}
    per_mac = {u: sum(by[n]["int8-dynamic"] - by[n]["int8"] for n in u) / sum(macs[n] for n in u)
               for u in mixed.units(macs)}
    top = max(per_mac, key=per_mac.get)
    if sum(macs[n] for n in top) <= (1 - share) * sum(macs.values()):
        assert notes["layers"][top[0]] == "int8"
    mix, full = kl(ref, log_probs(model, IDS)), kl(ref, log_probs(everywhere, IDS))
    print(f"{spec}: {notes['dynamic_share']:.0%} of the multiply-adds on int8 activations, formats {notes['formats']}, "
          f"KL {mix:.3g} (int8-dynamic everywhere: {full:.3g}), predicted {notes['predicted_kl']:.3g}")
    assert mix < full
    saved = artifact.save(model, tiny_causal.tokenizer, tmp_path / "a", {"spec": spec})
    back = artifact.load(saved, device="cpu")[0]
    assert mixed.module_formats(back) == notes["layers"]
    torch.testing.assert_close(log_probs(back, IDS), log_probs(model, IDS), rtol=0, atol=0)


def test_loading_a_mixed_artifact_without_its_layer_list_is_refused(tiny_causal):
    with pytest.raises(ValueError, match="the manifest's 'layers'"):
        specs.restore_(copy.deepcopy(tiny_causal.model), "mixed-6bit")


def plan_of(model, up: str) -> dict[str, str]:
    """A hand-made mix of the formats an export holds: the table and the MLP's gate int8, attention int4
    (symmetric, groups of 32), the MLP's up projection ``up``, its down projection float."""
    def fmt(name):
        return ("int8" if "embed" in name or "gate" in name else "int4s-g32" if "attn" in name
                else up if "up_proj" in name else "float")
    return {name: fmt(name) for name in sensitivity.layers(model)}


def test_a_mix_exports_to_compressed_tensors_with_a_group_per_scheme(make_tiny_llama, tiny_causal, tmp_path,
                                                                    float_int4_products):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(hidden=128)  # symmetric int4: transformers' loader refuses zero points (test_ctensors)
    mixed.swap_(model, plan_of(model, "int4s-g64"))
    saved = artifact.save(model, tiny_causal.tokenizer, tmp_path / "a", {"spec": "mixed-int4s-6bit"})
    out = export.export(str(saved), tmp_path / "ct")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = list(quant["config_groups"].values())
    assert all(t.startswith("re:^model.layers.") for g in groups for t in g["targets"])
    assert sorted((g["weights"]["num_bits"], g["weights"]["group_size"]) for g in groups) == [(4, 32), (4, 64),
                                                                                             (8, None)]
    assert not any("down_proj" in t for g in groups for t in g["targets"])  # float: no scheme
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back = models.load(out, device="cpu").model
    ours = log_probs(model, IDS)
    print(f"max |d log p| transformers {(ours - log_probs(theirs, IDS)).abs().max():.2e}, "
          f"reimport {(ours - log_probs(back, IDS)).abs().max():.2e}")
    assert (ours - log_probs(theirs, IDS)).abs().max() < 1e-3
    assert (ours - log_probs(back, IDS)).abs().max() < 1e-3
    block = back.model.layers[0]
    assert type(block.self_attn.q_proj) is type(block.mlp.up_proj) is qmodules.Int4WeightOnlyLinear
    assert type(block.mlp.gate_proj) is qmodules.Int8WeightOnlyLinear
    assert type(block.mlp.down_proj) is torch.nn.Linear


def test_a_mix_exports_to_gguf_with_a_type_per_tensor(make_tiny_llama, tiny_causal, tmp_path, float_int4_products):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(hidden=128)
    mixed.swap_(model, plan_of(model, "int4-g64"))
    saved = artifact.save(model, tiny_causal.tokenizer, tmp_path / "a", {"spec": "mixed-6bit",
                                                                         "base_model": {"id": "tiny"}})
    (file,) = export.export(str(saved), tmp_path / "gguf", "gguf").glob("*.gguf")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors}
    assert [kinds[f"{t}.weight"] for t in ("token_embd", "blk.0.attn_q", "blk.0.ffn_gate", "blk.0.ffn_up",
                                           "blk.0.ffn_down")] == ["Q8_0", "Q4_0", "Q8_0", "Q4_1", "F32"]
    theirs = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    diff = (log_probs(model, IDS) - log_probs(theirs, IDS)).abs().max()
    print(f"max |d log p| raypress vs transformers reading the GGUF {diff:.2e}")
    assert diff < 5e-3  # scales are float16 in GGUF


def test_a_dynamic_mix_exports_to_compressed_tensors_with_w8a8_and_w8a16_groups(outlier_llama, tiny_causal, tmp_path):
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(outlier_llama)
    layers = specs.apply_(model, "int8-dynamic-70", blocks=BLOCKS)["int8-dynamic-70"]["layers"]
    saved = artifact.save(model, tiny_causal.tokenizer, tmp_path / "a", {"spec": "int8-dynamic-70"})
    out = export.export(str(saved), tmp_path / "ct")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert sorted(bool(g["input_activations"]) for g in groups) == [False, True]  # W8A16 and W8A8 (per token)
    back = models.load(out, device="cpu").model
    assert mixed.module_formats(back) == {n: f for n, f in layers.items() if "embed" not in n} | {
        n: "float" for n in layers if "embed" in n}  # the table is written float, as for every int8 spec
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = log_probs(model, IDS)
    diff, again = (ours - log_probs(theirs, IDS)).abs().max(), (ours - log_probs(back, IDS)).abs().max()
    print(f"max |d log p| transformers {diff:.2e} (it rounds activations in float), reimport {again:.2e}")
    assert diff < 0.05 and again < 0.05


def test_min_grid_layers_are_refused_by_compressed_tensors_with_what_would_work(tiny_causal, tmp_path):
    model = copy.deepcopy(tiny_causal.model)
    mixed.swap_(model, {"model.layers.0.mlp.up_proj": "int4m-g32"})
    with pytest.raises(ctensors.ExportError, match="int4m"):
        ctensors.export_state(model, "mixed-6bit")
