"""serve/responses.py against the official openai package: every field raypress's response models hold is one the
matching openai type defines, and every body the builders make parses as that type with the values it was given."""

import typing

import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from pydantic import BaseModel

from engine.request import TokenLogprob
from serve import responses as rs

PAIRS = [(rs.Completion, oai.Completion), (rs.CompletionChoice, oai.CompletionChoice),
         (rs.ChatCompletion, oai_chat.ChatCompletion), (rs.ChatCompletionChunk, oai_chat.ChatCompletionChunk),
         (rs.EmbeddingList, oai.CreateEmbeddingResponse), (rs.FileObject, oai.FileObject), (rs.Batch, oai.Batch)]


def _nested(model: type[BaseModel], field: str) -> list[type[BaseModel]]:
    """The models a field holds (directly, in a list, optionally, or as members of a union)."""
    stack, found = [model.model_fields[field].annotation], []
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            found.append(t)
        else:
            stack += typing.get_args(t)
    return found


def _check_fields(ours: type[BaseModel], theirs: type[BaseModel], path: str) -> None:
    for name in ours.model_fields:
        assert name in theirs.model_fields, f"{path}.{name} is not a field of {theirs.__name__}"
        inner_ours, inner_theirs = _nested(ours, name), _nested(theirs, name)
        if inner_ours and inner_theirs:  # of a union (openai's function and custom tool calls), the one that fits
            fits = [t for t in inner_theirs if set(inner_ours[0].model_fields) <= set(t.model_fields)]
            _check_fields(inner_ours[0], (fits or inner_theirs)[0], f"{path}.{name}")


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_every_field_is_one_openai_defines(ours, theirs):
    _check_fields(ours, theirs, ours.__name__)


class Pieces:
    """Token ids' bytes, as engine.output.TokenBytes gives them."""

    def __init__(self, pieces: dict[int, bytes]):
        self.pieces = pieces

    def bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]

    def text(self, token_id: int) -> str:
        try:
            return self.pieces[token_id].decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in self.pieces[token_id])


def test_logprobs_report_a_tokens_own_bytes_and_offsets_in_whole_characters():
    """A token that holds part of a UTF-8 character ("本" is e6 9c ac) reports its own bytes, not U+FFFD's."""
    tokens = Pieces({1: b" \xe6", 2: b"\x9c\xac", 3: b"!"})
    lp = [TokenLogprob(token_id=t, logprob=-1.0) for t in (1, 2, 3)]
    chat = rs.chat_logprobs(lp, tokens)["content"]
    assert [c["bytes"] for c in chat] == [[32, 0xE6], [0x9C, 0xAC], [33]]
    assert chat[0]["token"] == "bytes:\\x20\\xe6" and chat[2]["token"] == "!"
    legacy = rs.completion_logprobs(lp, tokens, offset=10)
    assert legacy["text_offset"] == [10, 11, 12]  # " " is complete after token 1, " 本" after token 2


def test_built_bodies_parse_as_the_openai_types():
    lp = [TokenLogprob(token_id=5, logprob=-0.5, top=[(5, -0.5), (7, -1.5)])]
    text = Pieces({5: b"Hi", 7: b"Yo"})
    chat = oai_chat.ChatCompletion.model_validate(
        rs.chat_completion("m", ["Hello", "Hi"], ["stop", "length"], 7, 3, [rs.chat_logprobs(lp, text), None]))
    assert chat.choices[0].message.content == "Hello" and chat.usage.total_tokens == 10
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[1].finish_reason == "length"
    assert chat.choices[0].logprobs.content[0].top_logprobs[1].token == "Yo"
    plain = oai.Completion.model_validate(rs.completion("m", ["a", "b"], ["length", "stop"], 4, 6))
    assert [c.text for c in plain.choices] == ["a", "b"] and plain.choices[1].finish_reason == "stop"
    first = rs.chunk(True, "id1", 1, "m", [rs.ChatChunkChoice(index=0, delta=rs.Delta(role="assistant", content=""),
                                                             finish_reason=None)])
    assert "usage" not in first  # usage only in a last chunk of its own
    ended = oai_chat.ChatCompletionChunk.model_validate(
        rs.chunk(True, "id1", 1, "m", [rs.ChatChunkChoice(index=0, delta=rs.Delta(), finish_reason="length")]))
    assert ended.choices[0].finish_reason == "length" and ended.usage is None
    last = oai_chat.ChatCompletionChunk.model_validate(rs.chunk(True, "id1", 1, "m", [], rs.usage(3, 2)))
    assert last.usage.completion_tokens == 2 and last.choices == []
    echoed = rs.completion_logprobs([TokenLogprob(5, None), TokenLogprob(7, -1.5, [(7, -1.5)])], text)
    assert echoed["token_logprobs"] == [None, -1.5] and echoed["top_logprobs"] == [None, {"Yo": -1.5}]
    vectors = oai.CreateEmbeddingResponse.model_validate(rs.embeddings("m", [[0.5, 1.0]], 3, "float"))
    assert vectors.data[0].embedding == [0.5, 1.0] and vectors.usage.prompt_tokens == 3
    assert isinstance(rs.embeddings("m", [[0.5, 1.0]], 3, "base64")["data"][0]["embedding"], str)
    batch = {"id": "batch_1", "object": "batch", "endpoint": "/v1/embeddings", "input_file_id": "file-1",
             "completion_window": "24h", "status": "in_progress", "created_at": 1,
             "request_counts": {"total": 2, "completed": 1, "failed": 0}}
    assert oai.Batch.model_validate(rs.Batch.model_validate(batch).model_dump()).request_counts.completed == 1
