"""OpenAI's wire format as raypress reads it: request bodies and their checks, and error bodies.

The request models list the fields raypress honours: OpenAI's, and vLLM's extras (``top_k``, ``min_tokens``,
``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``guided_*``, ``structured_outputs``). Nothing a client
sends is silently dropped: an OpenAI field raypress does not implement gets a 400 that names it and says why
(``REFUSED``), unless its value asks for nothing (``"best_of": 1``, ``"store": false``); any other unknown field gets a
400 too, unless the server allows them (``allow_unknown_fields``). The checks and settings below are shared by the
synchronous routes and the Batch API's runner, so that a request gets the same answer or the same error both ways.
Response bodies are in serve/responses.py.
"""

from __future__ import annotations

import contextvars
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.sampling import MAX_TOP_LOGPROBS, Guided, logit_bias_pairs, stop_strings, token_ids_of

MAX_STOP = 4  # OpenAI's limit
MAX_MESSAGES = 1024
MAX_ITEMS = 2048  # prompts of a completion or inputs of an embedding request; servers may set a lower cap
MAX_N = 16  # sequences per prompt

_FUNCTIONS = "functions and function_call are OpenAI's deprecated form: send tools and tool_choice"
REFUSED = {  # OpenAI request fields raypress does not implement, and what to do instead
    "best_of": "best_of is not implemented: ask for n completions (with logprobs) and choose among them",
    "suffix": "suffix (text insertion) is not implemented",
    "audio": "audio output is not implemented: this server serves text",
    "modalities": "only the text modality is served",
    "prediction": "predicted outputs are not implemented",
    "functions": _FUNCTIONS, "function_call": _FUNCTIONS,
    "reasoning_effort": "reasoning_effort is for reasoning models; this server does not implement it",
    "web_search_options": "web search is not implemented",
    "store": "store (keeping completions on the server) is not implemented",
    "service_tier": "service tiers are not implemented",
    "dimensions": "dimensions (shortened embeddings) is not implemented: the model's own size is returned",
}
_ASKS_NOTHING = {  # values of refused fields that ask for nothing: accepted, as clients send them by default
    "best_of": (None, 1), "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "dimensions": (None,), "functions": (None, []),
    "function_call": (None, "none"), "reasoning_effort": (None,),
    "web_search_options": (None,), "store": (None, False), "service_tier": (None, "auto", "default"),
}
_ALLOW_UNKNOWN: list[contextvars.ContextVar] = []  # made at first use: Ray Serve pickles the app, a ContextVar not


def allow_unknown() -> contextvars.ContextVar:
    """Whether unknown fields are dropped instead of refused, for the request being parsed (the server sets it)."""
    if not _ALLOW_UNKNOWN:
        _ALLOW_UNKNOWN.append(contextvars.ContextVar("allow_unknown_fields", default=False))
    return _ALLOW_UNKNOWN[0]


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
    Of the errors a union field gives (one per type it accepts), the first that is not a plain type mismatch. A
    field the request model does not have is named with the reason it is refused."""
    def path(e: dict) -> list:
        return [p for p in e.get("loc", ()) if p != "body" and not _is_type_tag(p)]

    errors = errors or [{}]
    unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        where = ".".join(map(str, path(unknown[0])))
        name = str(path(unknown[0])[-1]) if path(unknown[0]) else where
        why = REFUSED.get(name, "unknown field: this server does not implement it (its OpenAPI document at "
                                "/openapi.json lists every field it takes)")
        return APIError(400, f"{where}: {why}", where)
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


def prompts_of(body: CompletionRequest, max_items: int = MAX_ITEMS) -> list[str | list[int]]:
    """The prompts of a completion request: texts, or token ids (a list of ints, or a list of such lists)."""
    p = body.prompt
    if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
        p = [p]
    return _items(p, "prompt", max_items)


def texts_of(body: EmbeddingRequest, max_items: int = MAX_ITEMS) -> list[str]:
    return _items(body.input, "input", max_items)


def _items(value, param: str, max_items: int) -> list:
    items = [value] if isinstance(value, str) else value
    if not items or any(not t for t in items):
        raise APIError(400, f"{param} must be a non-empty string or a list of non-empty strings (or of token ids)",
                       param)
    if len(items) > max_items:  # one request must not fan out past what the server queues
        raise APIError(400, f"{param} holds {len(items)} items; this server takes at most {max_items} per request",
                       param)
    return items


def generation_settings(body: _Sampling, default_max_tokens: int) -> dict:
    """The sampling settings every route and the Batch API take: max_tokens, temperature, top_p, seed, stop."""
    stop = stop_strings(body.stop)
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", "stop")
    return {"max_tokens": body.max_completion_tokens or body.max_tokens or default_max_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": stop}


def engine_settings(body: _Sampling, vocab_size: int) -> dict:
    """The rest of SamplingParams a request asks for (only those it sets): penalties, bias, end tokens, guided
    decoding. APIError names a token id outside the vocabulary or a grammar given twice."""
    out: dict[str, Any] = {name: getattr(body, name) for name in _ENGINE_FIELDS
                           if name in body.model_fields_set and getattr(body, name) is not None}  # null: the default
    if out.get("top_k") == -1:  # vLLM's "off"
        out["top_k"] = 0
    for name, check in (("logit_bias", logit_bias_pairs), ("stop_token_ids", token_ids_of)):
        if out.get(name) is not None:
            try:
                out[name] = check(out[name], vocab_size)
            except ValueError as e:
                raise APIError(400, f"{name}: {e}", name) from e
    guided = guided_of(body)
    if guided is not None:
        out["guided"] = guided
    return out


_ENGINE_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_tokens", "ignore_eos",
                  "logit_bias", "stop_token_ids")


def guided_of(body: _Sampling) -> Guided | None:
    """The one grammar a request asks for: response_format, a guided_* field or structured_outputs."""
    asked = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        asked.append(("response_format", Guided("json_object")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format: type json_schema needs json_schema.schema", "response_format")
        asked.append(("response_format", Guided("json_schema", json.dumps(rf.json_schema.schema_))))
    so = body.structured_outputs.model_dump(exclude_none=True, by_alias=True) if body.structured_outputs else {}
    for kind, value in [*((f"guided_{k}", getattr(body, f"guided_{k}")) for k in _GUIDED), *so.items()]:
        if value is None:
            continue
        k = kind.removeprefix("guided_")
        spec = value if isinstance(value, str) else json.dumps(value)  # a schema or choices may come as JSON text
        where = kind if kind.startswith("guided_") else "structured_outputs"
        try:
            asked.append((where, Guided("json_schema" if k == "json" else k, spec)))
        except ValueError as e:
            raise APIError(400, f"{where}: {e}", where) from e
    if len(asked) > 1:
        raise APIError(400, f"ask for one grammar at a time, not {[w for w, _ in asked]}", asked[1][0])
    return asked[0][1] if asked else None


_GUIDED = ("json", "regex", "choice", "grammar")


# -- request bodies ---------------------------------------------------------------------------------------------


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON may carry lone UTF-16 surrogates ("\\ud800"); no tokenizer takes them
        raise ValueError(f"text is not valid Unicode: {e.reason} at position {e.start}") from e
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class _Strict(BaseModel):
    """A request body that takes only its own fields: see the module docstring."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _asks_nothing(cls, data):
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (k in _ASKS_NOTHING and v in _ASKS_NOTHING[k])}
        if allow_unknown().get():
            known = {f.alias or name for name, f in cls.model_fields.items()}
            data = {k: v for k, v in data.items() if k in known or k in REFUSED}
        return data


class JSONSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None  # enforced either way: the output always parses as the schema


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: one of these."""

    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what a torch generator takes
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None  # an end-user id, as OpenAI takes it for abuse monitoring: logged nowhere, changes nothing
    response_format: ResponseFormat | None = None
    # vLLM's extras
    top_k: int = Field(default=0, ge=-1, le=2**31 - 1)
    min_tokens: int = Field(default=0, ge=0, le=2**31 - 1)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100.0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Text | Annotated[list[Text], Field(max_length=MAX_ITEMS)] | list[Annotated[int, Field(ge=0)]] | \
        Annotated[list[list[Annotated[int, Field(ge=0)]]], Field(max_length=MAX_ITEMS)]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value):
        """A list of content parts is taken when every part is text (joined by newlines, as vLLM joins them)."""
        if not isinstance(value, list):
            return value or ""
        kinds = [p.get("type") for p in value]
        other = next((k for k in kinds if k != "text"), None)
        if other is not None:
            raise ValueError(f"content parts of type {other!r} are not supported: this server serves a text model; "
                             "send text parts")
        return "\n".join(TextPart.model_validate(p).text for p in value)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # enforced either way where a call is required or named


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # several calls per answer (default); false: one (serve.tools)


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: Text | Annotated[list[Text], Field(max_length=MAX_ITEMS)]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 by default
    user: str | None = None


class BatchRequest(_Strict):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
