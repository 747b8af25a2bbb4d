import pytest

from compress import distill, gptq, prune, quantize, specs

CANONICAL = [
    "base", "bf16", "fp16", "int8", "int8-dynamic", "int4-g32", "int4-g64", "int4-g128", "gptq-int4-g128",
    "int4s-g64", "int4m-g32", "gptq-int4s-g32", "gptq-int4m-g128",
    "prune-50%", "prune-2:4", "wanda-50%", "wanda-2:4", "distill-L15", "prune-2:4+int8", "wanda-2:4+int8",
    "distill-L3+int8-dynamic", "smooth-int8-dynamic", "prune-2:4+smooth-int8-dynamic",
    "awq-int4-g128", "awq-int4s-g64", "awq-gptq-int4-g128", "awq-gptq-int4m-g32",
    "mixed-6bit", "mixed-6.35bit", "mixed-int4s-5.5bit", "mixed-int4-8bit", "prune-2:4+mixed-6bit",
    "int8-dynamic-90", "smooth-int8-dynamic-80",
]


@pytest.mark.parametrize("spec", CANONICAL)
def test_canonical_names_round_trip(spec):
    assert str(specs.parse(spec)) == spec


def test_steps_parse_to_configs_in_order():
    steps = specs.parse("wanda-2:4+gptq-int4-g64").steps
    assert steps == (prune.WandaPruneConfig(pattern="2:4"), gptq.GPTQConfig(group_size=64))
    assert specs.parse("distill-L6").steps == (distill.DistillConfig(layers=6),)
    assert specs.parse("int4-g32").steps == (quantize.Int4WeightOnlyConfig(group_size=32, grid="zero_point"),)
    assert specs.parse("int4m-g64").steps == (quantize.Int4WeightOnlyConfig(group_size=64, grid="min"),)
    assert specs.parse("gptq-int4s-g32").steps == (gptq.GPTQConfig(group_size=32, grid="symmetric"),)


@pytest.mark.parametrize("bad,message", [
    ("int7", "unknown step 'int7'"),
    ("int4-g100", "group_size=100"),
    ("prune-0%", "sparsity=0.0"),
    ("prune-4:2", "pattern='4:2'"),
    ("int8+", "unknown step ''"),
    ("", "non-empty"),
    ("distill-L0", "layers=0"),
    ("mixed-4bit", "bits=4.0: expected 4.5 <= bits < 32"),
    ("mixed-int4x-6bit", "unknown step 'mixed-int4x-6bit'"),
    ("int8-dynamic-100", "percent=100: expected 0 < percent < 100"),
])
def test_bad_specs_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        specs.parse(bad)


def test_calibrated_methods_refuse_to_run_without_calibration(tiny_causal):
    with pytest.raises(ValueError, match="needs calibration text"):
        specs.apply_(tiny_causal.model, "gptq-int4-g128")
