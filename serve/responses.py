"""The bodies raypress answers with, as typed models in OpenAI's shapes: whole completions, chat completions and
their streamed chunks, embeddings, and the Batch API's file and batch objects. Each field is one OpenAI defines
(tests/serve/test_responses.py checks them against the official ``openai`` package's types); the builders return
``model_dump(exclude_unset=True)``, so a body holds what raypress set and nothing else (``object`` and the like have
no defaults: a builder sets each).
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Literal

import numpy as np
from pydantic import BaseModel

from engine.request import TokenLogprob

FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose keys and values came from the engine's prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: dict | None = None


class Completion(BaseModel):
    """A ``text_completion``, whole or (``stream: true``) one chunk of it."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: dict | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(BaseModel):
    """A streamed tool call: raypress sends each call whole, in one chunk (``id``, ``type``, the name and all the
    arguments)."""

    index: int  # which call of the answer
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: dict | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a string with encoding_format base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"]
    expires_at: int | None = None
    status_details: str | None = None


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


# -- builders ---------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """An OpenAI-style id: the prefix with its separator ("chatcmpl-", "file-", "batch_", "req_"), then 24 hex."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def completion(model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int,
               logprobs: list | None = None, cached_tokens: int = 0) -> dict:
    """A whole ``text_completion``: one choice per prompt."""
    logprobs = logprobs or [None] * len(texts)
    choices = [CompletionChoice(index=k, text=t, finish_reason=f, logprobs=lp)
               for k, (t, f, lp) in enumerate(zip(texts, finish_reasons, logprobs, strict=True))]
    return Completion(id=new_id("cmpl-"), object="text_completion", created=int(time.time()), model=model,
                      choices=choices, usage=usage(prompt_tokens, completion_tokens, cached_tokens)
                      ).model_dump(exclude_unset=True)


def chat_completion(model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int,
                    completion_tokens: int, logprobs: list | None = None, cached_tokens: int = 0,
                    tool_calls: list[list[dict] | None] | None = None) -> dict:
    """A whole ``chat.completion``: one choice per sequence (``n``); a choice with tool calls has no content and
    finish_reason ``tool_calls``."""
    logprobs = logprobs or [None] * len(texts)
    tool_calls = tool_calls or [None] * len(texts)
    choices = []
    for k, (t, f, lp, calls) in enumerate(zip(texts, finish_reasons, logprobs, tool_calls, strict=True)):
        message = AssistantMessage(role="assistant", content=t if not calls else None)
        if calls:
            message.tool_calls = [ToolCall.model_validate(c) for c in calls]
        choices.append(ChatChoice(index=k, message=message, finish_reason="tool_calls" if calls else f, logprobs=lp))
    body = ChatCompletion(id=new_id("chatcmpl-"), object="chat.completion", created=int(time.time()), model=model,
                          choices=choices, usage=usage(prompt_tokens, completion_tokens, cached_tokens))
    return body.model_dump(exclude_unset=True)


def chunk(chat: bool, rid: str, created: int, model: str, choices: list[ChatChunkChoice | CompletionChoice],
          usage: Usage | None = None) -> dict:
    """One server-sent event's body; with ``stream_options.include_usage`` the last has no choices and the usage."""
    cls, obj = (ChatCompletionChunk, "chat.completion.chunk") if chat else (Completion, "text_completion")
    extra = {"usage": usage} if usage is not None else {}
    return cls(id=rid, object=obj, created=created, model=model, choices=choices, **extra).model_dump(
        exclude_unset=True)


def embeddings(model: str, vectors: list[list[float]], prompt_tokens: int, encoding_format: str) -> dict:
    if encoding_format == "base64":  # little-endian float32 bytes, as OpenAI sends them
        vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
    data = [Embedding(object="embedding", index=k, embedding=v) for k, v in enumerate(vectors)]
    return EmbeddingList(object="list", data=data, model=model, usage=EmbeddingUsage(prompt_tokens=prompt_tokens,
                                                                      total_tokens=prompt_tokens)).model_dump()


def chat_logprobs(entries: list[TokenLogprob] | None, tokens) -> dict | None:
    """``choices[].logprobs`` of a chat completion: one entry per token, with its top alternatives. ``tokens``
    gives each id's ``text`` and ``bytes`` (an engine.output.TokenBytes)."""
    if entries is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        return {"token": tokens.text(token_id), "logprob": logprob, "bytes": list(tokens.bytes(token_id))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob] | None, tokens, offset: int = 0) -> dict | None:
    """``choices[].logprobs`` of a (legacy) completion: parallel lists. A token's text offset is the number of
    characters its predecessors complete (a token that ends half a UTF-8 character adds none), from ``offset``. An
    entry whose logprob is None (the first token of an echoed prompt) has null for its logprob and alternatives."""
    if entries is None:
        return None
    offsets, done = [], b""
    for e in entries:
        offsets.append(offset + len(done.decode("utf-8", errors="ignore")))
        done += tokens.bytes(e.token_id)
    return {"tokens": [tokens.text(e.token_id) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else {tokens.text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}
