"""The Ray Serve application: any model raypress loads, behind OpenAI-compatible routes.

    serve run serve/config.yaml                                   # the built-in default, settings in the YAML
    serve run serve.app:build model=artifacts/sweep-smollm2/chosen

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true`` sends server-sent
events token by token), POST /v1/embeddings (encoder models), GET /health. Concurrent requests are batched inside
a replica with ``@serve.batch``; every request keeps its own sampling parameters. With RAYPRESS_API_KEY set where
the application is built, requests need ``Authorization: Bearer <key>``. Bad requests get 400 with an OpenAI-style
error body; a full queue (``max_queued_requests`` in the YAML) gets 503 from Serve.
"""

import asyncio
import base64
import collections
import logging
import os
import threading
import time
import uuid
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException

from compress import generate as gen
from compress import models

log = logging.getLogger("ray.serve")
api = FastAPI(title="raypress")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return JSONResponse(_error_body(e.message, e.kind, e.param), status_code=e.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return JSONResponse(_error_body(f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                                    "invalid_request_error", where or None), status_code=400)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):
    return JSONResponse(_error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)


# ---------------------------------------------------------------------------------------------------------------
# Request bodies (the OpenAI fields raypress honours; others are ignored)


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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64 by default


# ---------------------------------------------------------------------------------------------------------------
# The deployment


@serve.deployment(max_ongoing_requests=16)
@serve.ingress(api)
class ModelServer:
    def __init__(
        self,
        model: str = models.DEFAULT_MODEL,
        model_name: str | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.1,
        default_max_tokens: int = 64,
        num_threads: int | None = None,
        api_key: str | None = None,
    ):
        self.num_threads = num_threads
        start = time.perf_counter()
        self.model, self.tokenizer, self.kind = models.load(model)
        self.name = model_name or os.path.basename(os.path.normpath(str(model)))
        self.context = gen.context_length(self.model) if self.kind == models.CAUSAL else 512
        self.default_max_tokens = default_max_tokens
        self.api_key = api_key
        self._torch_lock = threading.Lock()  # one forward at a time: batches and streams take turns
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._embed_batch.set_max_batch_size(max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes = collections.deque(maxlen=1000)  # sizes of the latest batches, for /stats
        log.info("raypress: serving %s (%s) as %r in %.1f s", model, self.kind, self.name, time.perf_counter() - start)

    # -- routes: parse, check, delegate ---------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.name}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "raypress"}]}

    @api.get("/stats")
    async def stats(self, request: Request) -> dict:
        self._authorize(request)
        return {"batch_sizes": list(self.batch_sizes)}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request)
        self._check_model(body.model, causal=True)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or a list of non-empty strings", "prompt")
        ids = [self._encode(p) for p in prompts]
        params = self._params(body, max(len(i) for i in ids))
        if body.stream:
            if len(ids) > 1:
                raise APIError(400, "stream: true takes a single prompt", "prompt")
            return self._sse(ids[0], params, chat=False)
        results = await asyncio.gather(*(self._generate_batch((i, params)) for i in ids))
        choices = [{"index": k, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for k, r in enumerate(results)]
        return self._response("text_completion", "cmpl", choices, sum(map(len, ids)),
                              sum(len(r.token_ids) for r in results))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        self._authorize(request)
        self._check_model(body.model, causal=True)
        messages = [m.model_dump() for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may reject a message order; that is the request's fault
            message = f"messages could not be formatted with the model's chat template: {e}"
            raise APIError(400, message, "messages") from e
        ids = self._encode(text)
        params = self._params(body, len(ids))
        if body.stream:
            return self._sse(ids, params, chat=True)
        r = await self._generate_batch((ids, params))
        choices = [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}]
        return self._response("chat.completion", "chatcmpl", choices, len(ids), len(r.token_ids))

    @api.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest, request: Request):
        self._authorize(request)
        self._check_model(body.model, causal=False)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise APIError(400, "input must be a non-empty string or a list of non-empty strings", "input")
        counts = [len(self.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
        too_long = [k for k, c in enumerate(counts) if c > self.context]
        if too_long:
            raise APIError(400, f"input {too_long[0]} has {counts[too_long[0]]} tokens; the model takes at most "
                                f"{self.context}", "input")
        vectors = await asyncio.gather(*(self._embed_batch(t) for t in texts))
        if body.encoding_format == "base64":  # little-endian float32 bytes, as OpenAI sends them
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        data = [{"object": "embedding", "index": k, "embedding": v} for k, v in enumerate(vectors)]
        usage = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
        return {"object": "list", "data": data, "model": self.name, "usage": usage}

    # -- the work -------------------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, items: list[tuple[list[int], gen.SamplingParams]]) -> list[gen.Generation]:
        self.batch_sizes.append(len(items))
        ids, params = [i for i, _ in items], [p for _, p in items]
        return await asyncio.to_thread(self._locked, gen.generate, self.model, self.tokenizer, ids, params)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        self.batch_sizes.append(len(texts))
        emb = await asyncio.to_thread(self._locked, models.encode, self.model, self.tokenizer, texts)
        return emb.tolist()

    def _locked(self, fn, *args):
        """Run ``fn`` holding the model. The thread count is set here, in the worker thread: OpenMP keeps it per
        thread, and worker threads start from OMP_NUM_THREADS (which Ray sets to the replica's num_cpus)."""
        import torch

        with self._torch_lock:
            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            return fn(*args)

    def _sse(self, ids: list[int], params: gen.SamplingParams, chat: bool) -> StreamingResponse:
        """Server-sent events: one chunk per generated token, then the finish reason and usage, then [DONE]."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def produce():
            sent = ""
            for (g,) in gen.stream(self.model, self.tokenizer, [ids], [params]):
                delta, sent = g.text[len(sent):], g.text
                loop.call_soon_threadsafe(queue.put_nowait, (delta, g.finish_reason, len(g.token_ids)))

        def run():
            try:
                self._locked(produce)
            except Exception as e:
                loop.call_soon_threadsafe(queue.put_nowait, e)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        kind, prefix = ("chat.completion.chunk", "chatcmpl") if chat else ("text_completion", "cmpl")
        rid, created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": kind, "created": created, "model": self.name, "choices": [choice]}

        async def events():
            import json

            threading.Thread(target=run, daemon=True).start()
            if chat:
                yield f"data: {json.dumps(chunk('', None, first=True))}\n\n"
            n_out = 0
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    yield f"data: {json.dumps(_error_body(str(item), 'server_error'))}\n\n"
                    break
                delta, finish, n_out = item
                body = chunk(delta, finish)
                if finish:
                    body["usage"] = {"prompt_tokens": len(ids), "completion_tokens": n_out,
                                     "total_tokens": len(ids) + n_out}
                if delta or finish:
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- checks ---------------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error")

    def _check_model(self, requested: str | None, causal: bool) -> None:
        if requested is not None and requested != self.name:
            raise APIError(400, f"unknown model {requested!r}; this server serves {self.name!r}", "model",
                           kind="invalid_request_error")
        if causal and self.kind != models.CAUSAL:
            raise APIError(400, f"model {self.name!r} is an encoder: it serves /v1/embeddings, not text generation",
                           "model")
        if not causal and self.kind != models.ENCODER:
            raise APIError(400, f"model {self.name!r} is a causal LM: embeddings need an encoder model", "model")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _params(self, body: _Sampling, prompt_tokens: int) -> gen.SamplingParams:
        max_tokens = body.max_completion_tokens or body.max_tokens or self.default_max_tokens
        if prompt_tokens + max_tokens > self.context:
            raise APIError(400, f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the model's "
                                f"context of {self.context} tokens", "max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return gen.SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, stop=stop)

    def _response(self, obj: str, prefix: str, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()), "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


BUILD_ARGS = {"model", "model_name", "max_batch_size", "batch_wait_timeout_s", "default_max_tokens", "num_threads",
              "api_key"}


def server_args(args: dict | None) -> dict:
    """Check and convert application args (strings from `serve run ... key=value`) into ModelServer's arguments.
    The API key comes from ``args["api_key"]`` or, where the application is built, RAYPRESS_API_KEY."""
    args = dict(args or {})
    unknown = set(args) - BUILD_ARGS
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; allowed: {sorted(BUILD_ARGS)}")
    args.setdefault("api_key", os.environ.get("RAYPRESS_API_KEY") or None)
    for key in ("max_batch_size", "default_max_tokens", "num_threads"):
        if key in args and args[key] is not None:
            args[key] = int(args[key])
    if "batch_wait_timeout_s" in args:
        args["batch_wait_timeout_s"] = float(args["batch_wait_timeout_s"])
    return args


def build(args: dict) -> serve.Application:
    """Application builder for `serve run` and the Serve YAML; deployment options (replicas, autoscaling, queue
    limits) come from the YAML's ``deployments`` section."""
    return ModelServer.bind(**server_args(args))


app = build({})
