"""OpenAI's wire format as raypress speaks it: request bodies, error bodies, and response and chunk shapes.

The request models list the OpenAI fields raypress honours (others are ignored); the checks and settings below are
shared by the synchronous routes and the Batch API's runner, so that a request gets the same answer or the same
error both ways. Responses are the dicts OpenAI sends (``completion``, ``chat_completion``, ``embeddings``), with
log-probabilities in each endpoint's own shape.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from compress.sampling import MAX_TOP_LOGPROBS, TokenLogprob


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> APIError:
    """A pydantic validation failure as the 400 the routes answer: the first problem, with the field it names."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)


def check_model(requested: str | None, served: str, served_is_causal: bool, causal: bool) -> None:
    """The request's ``model`` names the served one (or none), and the endpoint fits the model's kind."""
    if requested is not None and requested != served:
        raise APIError(400, f"unknown model {requested!r}; this server serves {served!r}", "model")
    if causal and not served_is_causal:
        raise APIError(400, f"model {served!r} is an encoder: it serves /v1/embeddings, not text generation", "model")
    if not causal and served_is_causal:
        raise APIError(400, f"model {served!r} is a causal LM: embeddings need an encoder model", "model")


def prompts_of(body: CompletionRequest) -> list[str]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt must be a non-empty string or a list of non-empty strings", "prompt")
    return prompts


def texts_of(body: EmbeddingRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise APIError(400, "input must be a non-empty string or a list of non-empty strings", "input")
    return texts


def generation_settings(body: _Sampling, default_max_tokens: int) -> dict:
    """The sampling settings a generation request asks for (SamplingParams' fields, logprobs aside)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", "stop")
    return {"max_tokens": body.max_completion_tokens or body.max_tokens or default_max_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": stop}


# -- request bodies ---------------------------------------------------------------------------------------------


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 by default


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


# -- responses --------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(obj: str, rid: str, model: str, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def completion(model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int, completion_tokens: int,
               logprobs: list | None = None) -> dict:
    """A whole ``text_completion``: one choice per prompt."""
    logprobs = logprobs or [None] * len(texts)
    choices = [{"index": k, "text": t, "finish_reason": f, "logprobs": lp}
               for k, (t, f, lp) in enumerate(zip(texts, finish_reasons, logprobs, strict=True))]
    return response("text_completion", new_id("cmpl"), model, choices, prompt_tokens, completion_tokens)


def chat_completion(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                    logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
              "logprobs": logprobs}
    return response("chat.completion", new_id("chatcmpl"), model, [choice], prompt_tokens, completion_tokens)


def embeddings(model: str, vectors: list[list[float]], prompt_tokens: int, encoding_format: str) -> dict:
    if encoding_format == "base64":  # little-endian float32 bytes, as OpenAI sends them
        vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
    data = [{"object": "embedding", "index": k, "embedding": v} for k, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def chat_logprobs(entries: list[TokenLogprob] | None, token_text) -> dict | None:
    """``choices[].logprobs`` of a chat completion: one entry per token, with its top alternatives."""
    if entries is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob] | None, token_text, offset: int = 0) -> dict | None:
    """``choices[].logprobs`` of a (legacy) completion: parallel lists, text offsets counted from ``offset``."""
    if entries is None:
        return None
    tokens = [token_text(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}
