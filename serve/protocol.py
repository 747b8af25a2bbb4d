"""OpenAI's wire format as raypress reads it: request bodies and their checks, and error bodies.

The request models list the OpenAI fields raypress honours (others are ignored); the checks and settings below are
shared by the synchronous routes and the Batch API's runner, so that a request gets the same answer or the same
error both ways. Response bodies are in serve/responses.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from engine.sampling import MAX_TOP_LOGPROBS, stop_strings

MAX_STOP = 4  # OpenAI's limit
MAX_MESSAGES = 1024
MAX_ITEMS = 2048  # prompts of a completion or inputs of an embedding request; servers may set a lower cap


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error the server answers (OpenAI's shape)."""
    error: ErrorDetail


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(errors: list[dict]) -> APIError:
    """A pydantic validation failure as the 400 the routes answer: the first problem, with the field it names.
    Of the errors a union field gives (one per type it accepts), the first that is not a plain type mismatch."""
    def path(e: dict) -> list:
        return [p for p in e.get("loc", ()) if p != "body" and not _is_type_tag(p)]

    errors = errors or [{}]
    same = [e for e in errors if path(e)[:1] == path(errors[0])[:1]]
    first = next((e for e in same if not e.get("type", "").endswith("_type")), same[0])
    where = ".".join(map(str, path(first)))
    return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)


def _is_type_tag(part) -> bool:
    """pydantic names the member of a union it tried ("str", "list[str]", "function-after[...]") in ``loc``."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in _TYPE_TAGS)


def check_model(requested: str | None, served: str, served_is_causal: bool, causal: bool) -> None:
    """The request's ``model`` names the served one (or none), and the endpoint fits the model's kind."""
    if requested is not None and requested != served:
        raise APIError(400, f"unknown model {requested!r}; this server serves {served!r}", "model")
    if causal and not served_is_causal:
        raise APIError(400, f"model {served!r} is an encoder: it serves /v1/embeddings, not text generation", "model")
    if not causal and served_is_causal:
        raise APIError(400, f"model {served!r} is a causal LM: embeddings need an encoder model", "model")


def prompts_of(body: CompletionRequest, max_items: int = MAX_ITEMS) -> list[str]:
    return _items(body.prompt, "prompt", max_items)


def texts_of(body: EmbeddingRequest, max_items: int = MAX_ITEMS) -> list[str]:
    return _items(body.input, "input", max_items)


def _items(value: str | list[str], param: str, max_items: int) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not items or any(not t for t in items):
        raise APIError(400, f"{param} must be a non-empty string or a list of non-empty strings", param)
    if len(items) > max_items:  # one request must not fan out past what the server queues
        raise APIError(400, f"{param} holds {len(items)} items; this server takes at most {max_items} per request",
                       param)
    return items


def generation_settings(body: _Sampling, default_max_tokens: int) -> dict:
    """The sampling settings a generation request asks for (SamplingParams' fields, logprobs aside)."""
    stop = stop_strings(body.stop)
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", "stop")
    return {"max_tokens": body.max_completion_tokens or body.max_tokens or default_max_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": stop}


# -- request bodies ---------------------------------------------------------------------------------------------


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON may carry lone UTF-16 surrogates ("\\ud800"); no tokenizer takes them
        raise ValueError(f"text is not valid Unicode: {e.reason} at position {e.start}") from e
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what a torch generator takes
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(max_length=MAX_ITEMS)]
    logprobs: int | None = Field(default=None, ge=0, le=5)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: Text | Annotated[list[Text], Field(max_length=MAX_ITEMS)]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 by default


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
