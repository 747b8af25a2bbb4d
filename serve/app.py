"""The Ray Serve application: any model raypress loads, behind OpenAI-compatible routes.

    serve run serve/config.yaml                                   # the built-in default, settings in the YAML
    serve run serve.app:build model=artifacts/sweep-smollm2/chosen

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream: true`` sends server-sent
events token by token), POST /v1/embeddings (encoder models), GET /health, GET /metrics (Prometheus text), GET
/stats. Every generation request goes to the replica's engine (engine.core): requests join and leave the
running batch at every decode step, streaming and non-streaming alike, and a client that goes away frees its slot
within a step. Embeddings are batched with ``@serve.batch``. With RAYPRESS_API_KEY set where the application is
built, requests need ``Authorization: Bearer <key>``. Bad requests get 400 with an OpenAI-style error body; a full
queue (``max_queued_requests`` in the YAML) gets 503 from Serve.
"""

import asyncio
import copy
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from compress import encoders, models
from engine.core import Engine
from engine.interface import EngineClient
from jobs.placement import warn_if_gpus_idle
from jobs.storage import local_model
from serve import protocol as oa
from serve import responses as rs
from serve.batch_store import BatchStore, database_path
from serve.batches import POLL_S, Batches, file_object
from serve.completions import Completions
from serve.engines import ENGINES, config_of, vllm_engine, warn_unused
from serve.metrics import prometheus_text
from serve.protocol import APIError, BatchRequest, ChatRequest, CompletionRequest, EmbeddingRequest, error_body
from serve.settings import served_name, server_args

log = logging.getLogger("ray.serve")
api = FastAPI(title="raypress")
MAX_UPLOAD_BYTES = 200 << 20  # a Batch API input file, as OpenAI caps it


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    """Every error the app answers goes through here: OpenAI's error body with the status."""
    return JSONResponse(error_body(e.message, e.kind, e.param), status_code=e.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return await _api_error(request, oa.validation_error(e.errors()))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):
    return await _api_error(request, APIError(e.status_code, str(e.detail)))


class _Guard:
    """The first thing every request meets, before any byte of its body is read: the API key (every route but
    /health, the schema and /docs included), then the body cap, on the declared Content-Length and again on the bytes
    as they arrive (a chunked body declares none). A request that fails either is answered at once; the rest of its
    body is never read, so neither the server's memory nor its disk grows by it. Uploads to /v1/files have a cap of
    their own."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = serve.get_replica_context().servable_object
        oa.allow_unknown().set(server.allow_unknown_fields)  # read by the request models as this request is parsed
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, root = scope["path"], scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path  # the path below the app's prefix
        limit = server.max_upload_bytes if route == "/v1/files" else server.max_request_bytes
        length = headers.get("content-length", "")
        try:
            if route != "/health":
                server._authorize(headers.get("authorization", ""))
            if length.isdigit() and int(length) > limit:
                raise _too_large(length, limit)
        except APIError as e:
            response = JSONResponse(error_body(e.message, e.kind, e.param), status_code=e.status,
                                    headers={"connection": "close"})  # the unread body is not waited for
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # FastAPI passes an HTTPException from the body's reading on to our handler
                raise HTTPException(413, _too_large(f"more than {limit}", limit).message)
            return message

        await self.app(scope, counted, send)


def _too_large(size: str, limit: int) -> APIError:
    return APIError(413, f"request body of {size} bytes is over this server's limit of {limit} bytes")


api.add_middleware(_Guard)


ERROR_STATUSES = {400: "the request is invalid (OpenAI error body)", 401: "missing or wrong API key",
                  404: "no such file or batch", 409: "the batch is not running", 413: "the body is too large",
                  500: "the model failed", 503: "the replica's queue is full (Ray Serve's max_queued_requests)"}


def _openapi() -> dict:
    """The published schema as the server behaves: errors are 400 with OpenAI's body (FastAPI would list 422),
    and each route lists the statuses it can answer."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        error = oa.ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(error.pop("$defs", {}))
        components["ErrorResponse"] = error
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                if path == "/health":
                    continue
                codes = [400, 401, 413, 500, 503]
                codes += [404] if "{" in path or path == "/v1/batches" else []  # an id, input_file_id, after
                codes += [409] if path.endswith("/cancel") else []
                for code in sorted(codes):
                    operation["responses"][str(code)] = {"description": ERROR_STATUSES[code], "content": body}
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(api)
class ModelServer:
    def __init__(
        self,
        model: str = models.DEFAULT_MODEL,
        model_name: str | None = None,
        max_num_seqs: int = 16,
        max_model_len: int | None = None,
        max_batch_tokens: int = 512,
        block_size: int = 16,
        kv_cache_tokens: int | None = None,
        prefix_caching: bool = True,
        max_batch_size: int = 32,
        batch_wait_timeout_s: float = 0.01,
        default_max_tokens: int = 64,
        num_threads: int | None = None,
        api_key: str | None = None,
        max_items_per_request: int = 64,
        max_request_bytes: int = 8 << 20,
        allow_unknown_fields: bool = False,
        batch_storage: str = "~/.raypress/batches",
        batch_db: str | None = None,
        batch_actors: int = 1,
        batch_cpus_per_actor: float = 1.0,
        batch_gpus_per_actor: float = 0.0,
        batch_engine: str = "auto",
        batch_max_requests: int = 50_000,
        batch_max_num_seqs: int = 32,
        batch_jobs_address: str | None = None,
        batch_poll_s: float = POLL_S,
        engine: str = "raypress",
        tensor_parallel_size: int = 1,
    ):
        start = time.perf_counter()
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: expected one of {ENGINES}")
        warn_if_gpus_idle("ray_actor_options: {num_gpus: 1} on the deployment (serve/config.yaml), engine: vllm", log)
        source, model = model, local_model(model)  # a URI (a sweep's store): copied to this node once
        if engine == "vllm":  # vLLM loads the weights itself; raypress needs the tokenizer and config only
            warn_unused(type(self), {"max_batch_tokens": max_batch_tokens, "block_size": block_size,
                                     "kv_cache_tokens": kv_cache_tokens, "prefix_caching": prefix_caching})
            self.model = None
            self.tokenizer, self.kind = models.tokenizer_for(model)
            config = config_of(model)
        else:
            self.model, self.tokenizer, self.kind = models.load(model)
            config = self.model.config
        self.name = model_name or served_name(source, config)
        self.default_max_tokens, self.api_key, self.num_threads = default_max_tokens, api_key, num_threads
        self.max_items, self.max_request_bytes = max_items_per_request, max_request_bytes
        self.max_upload_bytes, self.allow_unknown_fields = MAX_UPLOAD_BYTES, allow_unknown_fields
        self.engine: EngineClient | None = None
        # text is encoded off the event loop, in one thread (a Rust tokenizer must not encode in two at once)
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        if engine == "vllm" and self.kind != models.CAUSAL:
            raise ValueError(f"engine vllm serves causal LMs; {model!r} is an encoder: use engine raypress")
        if self.kind == models.CAUSAL:
            if engine == "vllm":
                self.engine = vllm_engine(model, max_num_seqs, max_model_len or config.max_position_embeddings,
                                          tensor_parallel_size)
            else:  # the engine's thread detokenizes with its own copy: a Rust tokenizer must not be used by two
                self.engine = Engine(self.model, copy.deepcopy(self.tokenizer), max_num_seqs=max_num_seqs,
                                     max_model_len=max_model_len, max_batch_tokens=max_batch_tokens,
                                     num_threads=num_threads, block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                                     prefix_caching=prefix_caching).start()
            self.context = self.engine.max_model_len
            self.work = Completions(self.engine, self.tokenizer, self.name, default_max_tokens, self.context,
                                    config.vocab_size, self.tokenizing)
        else:
            self._encode_tokenizer = copy.deepcopy(self.tokenizer)
            self.context = encoders.input_limit(self.model.config)  # the loaded model's pooling config says it
            self._embed_batch.set_max_batch_size(max_batch_size)
            self._embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._batches, self._batch_settings = None, {
            "storage": batch_storage, "db": batch_db, "model": str(source), "actors": batch_actors,
            "cpus_per_actor": batch_cpus_per_actor, "gpus_per_actor": batch_gpus_per_actor, "engine": batch_engine,
            "max_requests": batch_max_requests, "jobs": batch_jobs_address,
            "max_num_seqs": batch_max_num_seqs, "default_max_tokens": default_max_tokens}
        self._stopping, self._poll_s = threading.Event(), batch_poll_s
        threading.Thread(target=self._poll_batches, name="batch-poll", daemon=True).start()
        log.info("raypress: serving %s (%s) as %r in %.1f s", model, self.kind, self.name, time.perf_counter() - start)

    def __del__(self):
        if getattr(self, "_stopping", None) is not None:
            self._stopping.set()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    def _poll_batches(self) -> None:
        """Refresh unfinished batches every ``batch_poll_s`` seconds, so that they expire and their files are
        registered without a client polling; a server whose Batch API was never used (no database) touches nothing."""
        while not self._stopping.wait(self._poll_s):
            try:
                b = self._batch_settings
                if self._batches is not None or os.path.exists(database_path(b["storage"], b["db"])):
                    self.batches.poll()
            except Exception as e:  # storage or the job API away: try again next time
                log.warning("raypress: polling batches failed: %s", e)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine can no longer answer is replaced."""
        if self.engine is not None:
            self.engine.check_health()

    # -- routes: parse, check, delegate ---------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.name}

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "raypress"}]}

    @api.get("/stats")
    async def stats(self) -> dict:
        if self.engine is None:
            return {"model": self.name}
        return {"model": self.name, **self.engine.stats().counters()}

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        text = prometheus_text(self.engine.stats(), self.name) if self.engine is not None else ""
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        self._check_model(body.model, causal=True)
        return await self.work.completions(body, self.max_items)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest):
        self._check_model(body.model, causal=True)
        return await self.work.chat(body)

    @api.post("/v1/embeddings")
    async def embeddings(self, body: EmbeddingRequest):
        self._check_model(body.model, causal=False)
        texts = oa.texts_of(body, self.max_items)
        counts = await asyncio.get_running_loop().run_in_executor(
            self.tokenizing, lambda: [len(self.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts])
        too_long = [k for k, c in enumerate(counts) if c > self.context]
        if too_long:
            raise APIError(400, f"input {too_long[0]} has {counts[too_long[0]]} tokens; the model takes at most "
                                f"{self.context}", "input")
        vectors = await asyncio.gather(*(self._embed_batch(t) for t in texts))
        return rs.embeddings(self.name, vectors, sum(counts), body.encoding_format)

    # -- the Batch API (serve/batches.py): files and batches, each batch a Ray job -----------------------------------

    @api.post("/v1/files")
    async def create_file(self, file: Annotated[UploadFile, File()],
                          purpose: Annotated[str, Form()]) -> dict:
        chunks = iter(lambda: file.file.read(1 << 20), b"")
        return await asyncio.to_thread(self.batches.add_file, chunks, file.filename, purpose)

    @api.get("/v1/files/{file_id}")
    async def get_file(self, file_id: str) -> dict:
        return file_object(await asyncio.to_thread(self.batches.file, file_id))

    @api.get("/v1/files/{file_id}/content")
    async def get_file_content(self, file_id: str) -> Response:
        await asyncio.to_thread(self.batches.file, file_id)
        data = await asyncio.to_thread(self.batches.store.read_file, file_id)
        return Response(data, media_type="application/octet-stream")

    @api.delete("/v1/files/{file_id}")
    async def delete_file(self, file_id: str) -> dict:
        return await asyncio.to_thread(self.batches.delete_file, file_id)

    @api.post("/v1/batches")
    async def create_batch(self, body: BatchRequest) -> dict:
        return await asyncio.to_thread(self.batches.create, body.input_file_id, body.endpoint,
                                       body.completion_window, body.metadata)

    @api.get("/v1/batches/{batch_id}")
    async def get_batch(self, batch_id: str) -> dict:
        return await asyncio.to_thread(self.batches.retrieve, batch_id)

    @api.get("/v1/batches")
    async def list_batches(self, limit: int = 20, after: str | None = None) -> dict:
        return await asyncio.to_thread(self.batches.list, limit, after)

    @api.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(self, batch_id: str) -> dict:
        return await asyncio.to_thread(self.batches.cancel, batch_id)

    @property
    def batches(self) -> Batches:
        """Made at the first Batch API call, so that a server that never sees one touches no storage."""
        if self._batches is None:
            b = self._batch_settings
            self._batches = Batches(
                BatchStore(b["storage"], b["db"]), model=b["model"], served_name=self.name,
                causal=self.kind == models.CAUSAL, default_max_tokens=b["default_max_tokens"],
                max_model_len=self.context, max_requests=b["max_requests"], max_file_bytes=self.max_upload_bytes,
                num_actors=b["actors"], cpus_per_actor=b["cpus_per_actor"], gpus_per_actor=b["gpus_per_actor"],
                engine=b["engine"], batch_size=b["max_num_seqs"], jobs_address=b["jobs"])
        return self._batches

    # -- the work -------------------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        emb = await asyncio.to_thread(self._encode_in_thread, texts)
        return emb.tolist()

    def _encode_in_thread(self, texts: list[str]):
        import torch

        if self.num_threads:  # OpenMP keeps the thread count per thread
            torch.set_num_threads(self.num_threads)
        return models.encode(self.model, self._encode_tokenizer, texts)

    # -- checks ---------------------------------------------------------------------------------------------------

    def _authorize(self, header: str) -> None:
        """``header``: the request's Authorization header."""
        if not self.api_key:
            return
        if not hmac.compare_digest(header.encode(), f"Bearer {self.api_key}".encode()):  # constant time
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error")

    def _check_model(self, requested: str | None, causal: bool) -> None:
        oa.check_model(requested, self.name, self.kind == models.CAUSAL, causal)


def build(args: dict) -> serve.Application:
    """Application builder for `serve run` and the Serve YAML; deployment options (replicas, autoscaling, queue
    limits) come from the YAML's ``deployments`` section."""
    return ModelServer.bind(**server_args(args))


app = build({})
