"""serve/protocol.py without a server: which fields a request may send, what each becomes, and the 400s."""

import json

import pytest
from pydantic import ValidationError

from engine.sampling import Guided
from serve import protocol as oa

HI = [{"role": "user", "content": "hi"}]


def refusal(model, **body) -> oa.APIError:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return oa.validation_error(e.value.errors())


def test_a_grammar_comes_from_any_one_of_its_fields():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
              Guided("json_schema", '{"type": "object", "properties": {"a": {"type": "integer"}}}')),
             ({"response_format": {"type": "json_object"}}, Guided("json_object")),
             ({"guided_json": schema}, Guided("json_schema", '{"type": "object", "properties": {"a": {"type": '
                                                              '"integer"}}}')),
             ({"guided_regex": "[a-z]+"}, Guided("regex", "[a-z]+")),
             ({"guided_choice": ["yes", "no"]}, Guided("choice", '["yes", "no"]')),
             ({"guided_grammar": 'root ::= "a"'}, Guided("grammar", 'root ::= "a"')),
             ({"structured_outputs": {"json": '{"type": "object"}'}}, Guided("json_schema", '{"type": "object"}')),
             ({"structured_outputs": {"choice": ["x"]}}, Guided("choice", '["x"]')),
             ({"response_format": {"type": "text"}}, None), ({}, None)]
    for body, expected in cases:
        assert oa.engine_settings(oa.ChatRequest(messages=HI, **body), 100).get("guided") == expected, body
    with pytest.raises(oa.APIError, match="one grammar at a time"):
        oa.engine_settings(oa.ChatRequest(messages=HI, guided_regex="a", response_format={"type": "json_object"}),
                           100)
    with pytest.raises(oa.APIError, match="needs json_schema.schema"):
        oa.engine_settings(oa.ChatRequest(messages=HI, response_format={"type": "json_schema"}), 100)


def test_engine_settings_hold_only_what_the_request_set_and_check_token_ids():
    body = oa.CompletionRequest(prompt="x", top_k=-1, logit_bias={"5": -100, "7": 2.5}, stop_token_ids=[3],
                                presence_penalty=0.5)
    assert oa.engine_settings(body, 10) == {"top_k": 0, "logit_bias": ((5, -100.0), (7, 2.5)), "stop_token_ids": (3,),
                                            "presence_penalty": 0.5}
    assert oa.engine_settings(oa.CompletionRequest(prompt="x"), 10) == {}
    nulls = oa.CompletionRequest(prompt="x", logit_bias=None, stop_token_ids=None)  # null is "not set" (a fuzzed
    assert oa.engine_settings(nulls, 10) == {}  # request once got a 500 here)
    for bad in ({"logit_bias": {"10": 1}}, {"logit_bias": {"word": 1}}, {"logit_bias": {"-1": 1}},
                {"stop_token_ids": [10]}, {"stop_token_ids": [2**70]}):
        with pytest.raises(oa.APIError) as e:
            oa.engine_settings(oa.CompletionRequest(prompt="x", **bad), 10)
        assert e.value.param == next(iter(bad))


def test_fields_are_refused_by_name_unless_they_ask_for_nothing():
    e = refusal(oa.CompletionRequest, prompt="x", best_of=4)
    assert e.param == "best_of" and "n completions" in e.message
    e = refusal(oa.ChatRequest, messages=HI, functions=[{"name": "f"}])
    assert e.param == "functions" and "tools" in e.message
    e = refusal(oa.ChatRequest, messages=[{"role": "user", "content": "hi", "mood": "glad"}])
    assert e.param == "messages.0.mood" and "unknown field" in e.message
    e = refusal(oa.ChatRequest, messages=[{"role": "user", "content": [{"type": "input_audio"}]}])
    assert e.param == "messages.0.content" and "input_audio" in e.message
    ok = oa.CompletionRequest.model_validate({"prompt": "x", "best_of": 1, "suffix": None, "store": False})
    assert ok.prompt == "x"
    parts = oa.ChatRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert parts.messages[0].content == "a\nb"


def test_unknown_fields_pass_only_where_the_server_allows_them():
    assert refusal(oa.CompletionRequest, prompt="x", colour="red").param == "colour"
    token = oa.allow_unknown().set(True)
    try:
        assert oa.CompletionRequest.model_validate({"prompt": "x", "colour": "red"}).prompt == "x"
        assert refusal(oa.CompletionRequest, prompt="x", best_of=2).param == "best_of"  # OpenAI's: still refused
    finally:
        oa.allow_unknown().reset(token)


def test_prompts_may_be_text_or_token_ids():
    assert oa.prompts_of(oa.CompletionRequest(prompt="a")) == ["a"]
    assert oa.prompts_of(oa.CompletionRequest(prompt=[1, 2, 3])) == [[1, 2, 3]]
    assert oa.prompts_of(oa.CompletionRequest(prompt=[[1, 2], [3]])) == [[1, 2], [3]]
    assert oa.prompts_of(oa.CompletionRequest(prompt=["a", "b"])) == ["a", "b"]
    with pytest.raises(oa.APIError):
        oa.prompts_of(oa.CompletionRequest(prompt=[]))


def test_a_batch_line_carries_what_its_rows_hold_and_refuses_the_rest_by_name():
    from serve.batch_job import to_rows

    chat = {"messages": HI, "max_tokens": 5, "presence_penalty": 0.5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}
    (row,) = to_rows(0, chat, "/v1/chat/completions", "m", True, 16)
    assert row["presence_penalty"] == 0.5 and row["json_schema"] == '{"type": "object"}' and row["max_tokens"] == 5
    more = {"messages": HI, "logit_bias": {"7": -100}, "top_k": -1, "stop_token_ids": [2], "ignore_eos": True,
            "guided_choice": ["yes", "no"], "response_format": {"type": "text"}}
    (row,) = to_rows(0, more, "/v1/chat/completions", "m", True, 16)
    assert json.loads(row["logit_bias"]) == {"7": -100} and row["guided_choice"] == ["yes", "no"]
    assert row["top_k"] == -1 and row["stop_token_ids"] == [2] and row["ignore_eos"] is True
    (row,) = to_rows(0, {"messages": HI, "response_format": {"type": "json_object"}}, "/v1/chat/completions", "m",
                     True, 16)
    assert row["guided_json_object"] is True and "json_schema" not in row
    (row,) = to_rows(0, {"prompt": "x", "guided_regex": "[a-z]+"}, "/v1/completions", "m", True, 16)
    assert row["guided_regex"] == "[a-z]+"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    history = [*HI, {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    (row,) = to_rows(0, {"messages": history, "tools": [tool], "parallel_tool_calls": False, "n": 3,
                         "tool_choice": {"type": "function", "function": {"name": "f"}}}, "/v1/chat/completions", "m",
                     True, 16)
    assert json.loads(row["tools"]) == [tool] and row["tool_choice"] == "f" and row["n"] == 3
    assert row["parallel_tool_calls"] is False and json.loads(row["messages"][1]["tool_calls"]) == calls
    assert row["messages"][2]["tool_call_id"] == "call_1"
    for extra, param in [({"logprobs": True, "top_logprobs": 2}, "logprobs"), ({"prompt": "x", "echo": True}, "echo"),
                         ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice")]:
        completions = "prompt" in extra
        with pytest.raises(oa.APIError) as e:
            to_rows(0, extra if completions else {"messages": HI, **extra},
                    "/v1/completions" if completions else "/v1/chat/completions", "m", True, 16)
        assert e.value.param == param, extra
    with pytest.raises(oa.APIError, match="token ids"):
        to_rows(0, {"prompt": [1, 2]}, "/v1/completions", "m", True, 16)
