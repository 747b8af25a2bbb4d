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
import time
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from compress import encoders, models
from engine.core import Engine
from engine.interface import EngineClient
from serve import protocol as oa
from serve import responses as rs
from serve.batch_store import BatchStore
from serve.batches import Batches, file_object
from serve.completions import Completions
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


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    """Bodies above the server's cap get 413 before they are read (uploads to /v1/files have their own cap)."""
    server = serve.get_replica_context().servable_object
    oa.allow_unknown().set(server.allow_unknown_fields)  # read by the request models as this request is parsed
    length = request.headers.get("content-length", "")
    if length.isdigit():
        upload = request.url.path.endswith("/v1/files")
        limit = server.max_upload_bytes if upload else server.max_request_bytes
        if int(length) > limit:
            message = f"request body of {length} bytes is over this server's limit of {limit} bytes"
            return await _api_error(request, APIError(413, message))
    return await call_next(request)


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


async def _authorized(request: Request) -> None:
    """The API key check of every route but /health, run before FastAPI reads and validates the body, so that a
    caller without the key learns nothing about what the route accepts."""
    serve.get_replica_context().servable_object._authorize(request)


KEY = [Depends(_authorized)]


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
        batch_max_requests: int = 50_000,
        batch_max_num_seqs: int = 32,
        batch_jobs_address: str | None = None,
    ):
        start = time.perf_counter()
        self.model, self.tokenizer, self.kind = models.load(model)
        self.name = model_name or served_name(model, self.model.config)
        self.default_max_tokens, self.api_key, self.num_threads = default_max_tokens, api_key, num_threads
        self.max_items, self.max_request_bytes = max_items_per_request, max_request_bytes
        self.max_upload_bytes, self.allow_unknown_fields = MAX_UPLOAD_BYTES, allow_unknown_fields
        self.engine: EngineClient | None = None
        if self.kind == models.CAUSAL:
            # the engine's thread detokenizes with its own copy: a Rust tokenizer must not be used by two threads
            self.engine = Engine(self.model, copy.deepcopy(self.tokenizer), max_num_seqs=max_num_seqs,
                                 max_model_len=max_model_len, max_batch_tokens=max_batch_tokens,
                                 num_threads=num_threads, block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                                 prefix_caching=prefix_caching).start()
            self.context = self.engine.max_model_len
            self.work = Completions(self.engine, self.tokenizer, self.name, default_max_tokens, self.context,
                                    self.model.config.vocab_size)
        else:
            self._encode_tokenizer = copy.deepcopy(self.tokenizer)
            self.context = encoders.input_limit(self.model.config)  # the loaded model's pooling config says it
            self._embed_batch.set_max_batch_size(max_batch_size)
            self._embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._batches, self._batch_settings = None, {
            "storage": batch_storage, "db": batch_db, "model": str(model), "actors": batch_actors,
            "cpus_per_actor": batch_cpus_per_actor, "max_requests": batch_max_requests, "jobs": batch_jobs_address,
            "max_num_seqs": batch_max_num_seqs, "default_max_tokens": default_max_tokens}
        log.info("raypress: serving %s (%s) as %r in %.1f s", model, self.kind, self.name, time.perf_counter() - start)

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine can no longer answer is replaced."""
        if self.engine is not None:
            self.engine.check_health()

    # -- routes: parse, check, delegate ---------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.name}

    @api.get("/v1/models", dependencies=KEY)
    async def list_models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "raypress"}]}

    @api.get("/stats", dependencies=KEY)
    async def stats(self) -> dict:
        if self.engine is None:
            return {"model": self.name}
        return {"model": self.name, **self.engine.stats().counters()}

    @api.get("/metrics", dependencies=KEY)
    async def metrics(self) -> PlainTextResponse:
        text = prometheus_text(self.engine.stats(), self.name) if self.engine is not None else ""
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.post("/v1/completions", dependencies=KEY)
    async def completions(self, body: CompletionRequest):
        self._check_model(body.model, causal=True)
        return await self.work.completions(body, self.max_items)

    @api.post("/v1/chat/completions", dependencies=KEY)
    async def chat_completions(self, body: ChatRequest):
        self._check_model(body.model, causal=True)
        return await self.work.chat(body)

    @api.post("/v1/embeddings", dependencies=KEY)
    async def embeddings(self, body: EmbeddingRequest):
        self._check_model(body.model, causal=False)
        texts = oa.texts_of(body, self.max_items)
        counts = [len(self.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
        too_long = [k for k, c in enumerate(counts) if c > self.context]
        if too_long:
            raise APIError(400, f"input {too_long[0]} has {counts[too_long[0]]} tokens; the model takes at most "
                                f"{self.context}", "input")
        vectors = await asyncio.gather(*(self._embed_batch(t) for t in texts))
        return rs.embeddings(self.name, vectors, sum(counts), body.encoding_format)

    # -- the Batch API (serve/batches.py): files and batches, each batch a Ray job -----------------------------------

    @api.post("/v1/files", dependencies=KEY)
    async def create_file(self, file: Annotated[UploadFile, File()],
                          purpose: Annotated[str, Form()]) -> dict:
        chunks = iter(lambda: file.file.read(1 << 20), b"")
        return await asyncio.to_thread(self.batches.add_file, chunks, file.filename, purpose)

    @api.get("/v1/files/{file_id}", dependencies=KEY)
    async def get_file(self, file_id: str) -> dict:
        return file_object(await asyncio.to_thread(self.batches.file, file_id))

    @api.get("/v1/files/{file_id}/content", dependencies=KEY)
    async def get_file_content(self, file_id: str) -> Response:
        await asyncio.to_thread(self.batches.file, file_id)
        data = await asyncio.to_thread(self.batches.store.read_file, file_id)
        return Response(data, media_type="application/octet-stream")

    @api.delete("/v1/files/{file_id}", dependencies=KEY)
    async def delete_file(self, file_id: str) -> dict:
        return await asyncio.to_thread(self.batches.delete_file, file_id)

    @api.post("/v1/batches", dependencies=KEY)
    async def create_batch(self, body: BatchRequest) -> dict:
        return await asyncio.to_thread(self.batches.create, body.input_file_id, body.endpoint,
                                       body.completion_window, body.metadata)

    @api.get("/v1/batches/{batch_id}", dependencies=KEY)
    async def get_batch(self, batch_id: str) -> dict:
        return await asyncio.to_thread(self.batches.retrieve, batch_id)

    @api.get("/v1/batches", dependencies=KEY)
    async def list_batches(self, limit: int = 20, after: str | None = None) -> dict:
        return await asyncio.to_thread(self.batches.list, limit, after)

    @api.post("/v1/batches/{batch_id}/cancel", dependencies=KEY)
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
                num_actors=b["actors"],
                cpus_per_actor=b["cpus_per_actor"], batch_size=b["max_num_seqs"], jobs_address=b["jobs"])
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

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
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
