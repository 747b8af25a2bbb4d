"""jobs.params without a model: how a batch row's columns, over the job's defaults, become SamplingParams."""

import json

import pytest

from engine.sampling import Guided
from jobs.params import row_params

DEFAULTS = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": (), "chat": False,
            "json_schema": '{"type": "object"}'}


def test_a_row_overrides_the_defaults_and_csv_text_reads_as_its_value():
    p = row_params({"max_tokens": "8", "top_k": "5", "logit_bias": '{"3": -100, "4": 2.5}', "stop_token_ids": "[9]",
                    "ignore_eos": "true", "json_schema": None}, {**DEFAULTS, "json_schema": None}, 100)
    assert p.max_tokens == 8 and p.top_k == 5 and p.logit_bias == ((3, -100.0), (4, 2.5))
    assert p.stop_token_ids == (9,) and p.ignore_eos is True and p.guided is None
    typed = row_params({"logit_bias": {"3": 1}, "stop_token_ids": [1, 2], "ignore_eos": False, "top_k": -1},
                       DEFAULTS, 100)  # JSON lines give objects, lists and booleans; top_k -1 is vLLM's "off"
    assert typed.logit_bias == ((3, 1.0),) and typed.stop_token_ids == (1, 2) and not typed.ignore_eos
    assert typed.top_k == 0 and typed.guided == Guided("json_schema", '{"type": "object"}')


def test_a_rows_grammar_replaces_the_jobs_and_two_grammars_in_one_row_are_refused():
    assert row_params({"guided_regex": "[0-9]+"}, DEFAULTS, 100).guided == Guided("regex", "[0-9]+")
    assert row_params({"guided_choice": ["yes", "no"]}, DEFAULTS, 100).guided == \
        Guided("choice", json.dumps(["yes", "no"]))
    assert row_params({"guided_choice": "yes"}, DEFAULTS, 100).guided == Guided("choice", '["yes"]')  # a CSV cell
    assert row_params({"guided_json_object": True}, DEFAULTS, 100).guided == Guided("json_object")
    assert row_params({"guided_json_object": False}, DEFAULTS, 100).guided == Guided("json_schema",
                                                                                     '{"type": "object"}')
    assert row_params({"guided_json_object": "false"}, DEFAULTS, 100).guided == Guided("json_schema",
                                                                                       '{"type": "object"}')
    with pytest.raises(ValueError, match="one grammar per row"):
        row_params({"guided_regex": "a", "guided_grammar": 'root ::= "a"'}, DEFAULTS, 100)


@pytest.mark.parametrize("row, message", [
    ({"logit_bias": '{"100": 1}'}, "not a token id of this model"),
    ({"logit_bias": "[1, 2]"}, "logit_bias"),
    ({"logit_bias": '{"1": 500}'}, "logit_bias"),  # SamplingParams holds bias to [-100, 100]
    ({"stop_token_ids": "[1, 200]"}, "not a token id of this model"),
    ({"stop_token_ids": "x"}, "stop_token_ids"),
    ({"ignore_eos": "maybe"}, "ignore_eos"),
    ({"top_k": "many"}, "top_k"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": "[not json"}, "guided_choice"),
    ({"guided_json_object": "perhaps"}, "guided_json_object"),
])
def test_a_bad_value_is_a_value_error_that_names_its_column(row, message):
    with pytest.raises(ValueError, match=message):
        row_params(row, DEFAULTS, 100)
