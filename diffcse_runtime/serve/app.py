"""The FastAPI app: OpenAI's /v1/embeddings and /v1/models, health, readiness and metrics.

`create_app({name: Encoder}, ServeSettings())` returns an ASGI app for uvicorn (or any ASGI
server). Requests are checked here (inputs, model, token limits, key) so every refusal is
one OpenAI-style error naming the field at fault; accepted texts go to the model's
`Batcher`, which merges concurrent requests into shared onnxruntime runs. The
text-embeddings-inference routes (`tei.py`) share the key check, the limits and
`ServedModel.embed`, the one path from texts to rows.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from diffcse_runtime.conventions import ConventionError, check_dim, resolve_prompt, truncate_dims
from diffcse_runtime.encoder import Encoder
from diffcse_runtime.model_dir import MODEL_FILE
from diffcse_runtime.serve.batching import Batcher, BatchSettings, QueueFull
from diffcse_runtime.serve.gate import (
    LOOPBACK_HOSTS,
    Access,
    ApiError,
    RequestGate,
    Stopping,
    check_api_key,
    log,
)
from diffcse_runtime.serve.metrics import ServeMetrics
from diffcse_runtime.serve.schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from diffcse_runtime.truncation import TokenCounts

INLINE_CHARS = 16_384  # requests with more text are tokenized off the event loop
# Server-wide memory of tokenizing: requests over INLINE_CHARS are tokenized one at a time,
# in tokenizers calls of TOKENIZE_CHUNK_CHARS characters at up to ~250 bytes each.
TOKENIZING_BYTES = 64 * 2**20
PATHS = {"/v1/embeddings", "/v1/models", "/health", "/ready", "/metrics"}
OPENAI_REMEDY = "shorten it, or start the server with --truncate"
# LangChain's OpenAIEmbeddings sends tiktoken ids by default: OpenAI's token numbering, which
# means nothing to this model's tokenizer
TOKEN_ARRAY_HINT = (
    "this server embeds text only, and token ids from another tokenizer (tiktoken's) would "
    "be meaningless to its model; send strings (LangChain: "
    "OpenAIEmbeddings(..., check_embedding_ctx_length=False))"
)


@dataclass
class ServeSettings:
    """Limits and behaviour of one server (the diffcse-serve options)."""

    api_keys: tuple[str, ...] = ()
    # Host header names served ('*': any) and browser origins allowed (CORS); see gate.py
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    cors_origins: tuple[str, ...] = ()
    max_inputs: int = 2048
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0  # the whole body must arrive within it (else 408)
    truncate: bool = False
    retry_after_s: int = 1
    batch: BatchSettings = field(default_factory=BatchSettings)


def memory_bound(settings: ServeSettings, max_seq_length: int, embedding_dim: int) -> int:
    """Bytes one request can hold at its peak, with the limits in `settings` (B: max body
    bytes, n: max inputs, L: max_seq_length, d: embedding_dim):

        6 B + n (36 L + 100 d)

    6 B: the raw body, its join, and its texts as Python strings (up to 4 bytes per
    character when one character needs it; 4 B more when the model puts a prompt before
    each text); 36 L per text: the kept token ids as Python ints; 100 d per text: the rows
    as floats, their JSON text and the bytes being sent.
    Tokenizing adds TOKENIZING_BYTES once for the whole server, whatever the number of
    requests (`Encoder.tokenize` works in bounded calls, one request at a time).
    """
    b, n = settings.max_body_bytes, settings.max_inputs
    return 6 * b + n * (36 * max_seq_length + 100 * embedding_dim)


@dataclass
class Embedded:
    """One request's texts as the model read them: raw rows, tokens read, indices cut."""

    rows: np.ndarray
    lengths: list[int]
    truncated: list[int]

    def headers(self) -> dict[str, str] | None:
        return {"X-Diffcse-Truncated": str(len(self.truncated))} if self.truncated else None


class ServedModel:
    """One model under its name: encoder and batcher."""

    def __init__(
        self,
        name: str,
        encoder: Encoder,
        settings: ServeSettings,
        metrics,
        tokenizing: asyncio.Semaphore | None = None,
    ) -> None:
        self.name = name
        self.encoder = encoder
        self.settings = settings
        self.metrics = metrics
        self.limit = encoder.max_seq_length
        # large requests are tokenized off the loop one at a time (shared by the models of
        # an app): tokenizing memory is then one bounded chunk, whatever the concurrency
        self.tokenizing = tokenizing or asyncio.Semaphore(1)
        # Rows leave the workers raw and each route normalises (or not) after any cut to
        # `dimensions`: the TEI route lets a request choose, and it costs one division per row
        self.batcher = Batcher(name, encoder, replace(settings.batch, normalize=False), metrics)
        # the graph itself may end in a Normalize module
        self.normalized = settings.batch.normalize or encoder.meta.normalized
        self.card = ModelCard(
            id=name,
            created=int(os.path.getmtime(encoder.path / MODEL_FILE)),
            embedding_dim=encoder.embedding_dim,
            max_input_tokens=encoder.max_seq_length,
        )

    async def embed(
        self,
        texts: list[str],
        request: Request,
        *,
        truncate: bool,
        single: bool,
        field: str = "input",
        remedy: str = OPENAI_REMEDY,
        prompt_name: str | None = None,
    ) -> Embedded:
        """The one path from checked texts to rows, for every route: tokenize once (bounded:
        `Encoder.tokenize`), refuse (or cut and report) texts the model would not read
        whole, queue the ids on the Batcher, count metrics.

        `field`, `single` and `remedy` only word the refusal for the route's own schema.
        The prompt goes first, as `Encoder.encode` puts it, and counts towards the limit.
        """
        self.prompt(prompt_name)  # a 400 naming prompt_name; Encoder.tokenize applies it
        tokenize = functools.partial(self.encoder.tokenize, prompt_name=prompt_name)
        if sum(map(len, texts)) > INLINE_CHARS:
            async with self.tokenizing:
                ids, counts = await asyncio.to_thread(tokenize, texts)
        else:
            ids, counts = tokenize(texts)
        truncated = _check_lengths(self, counts, truncate, _where(field, single), remedy)
        lengths = [len(row) for row in ids]
        request.state.log = {"model": self.name, "inputs": len(texts), "tokens": sum(lengths)}
        self.metrics.in_flight.inc()
        try:
            rows = await self.batcher.embed(ids)
        except QueueFull:
            retry = self.settings.retry_after_s
            raise ApiError(
                503,
                f"the queue of model {self.name!r} is full; retry after {retry} s",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(retry)},
            ) from None
        finally:
            self.metrics.in_flight.dec()
        self.metrics.inputs.labels(self.name).inc(len(texts))
        self.metrics.tokens.labels(self.name).inc(sum(lengths))
        if truncated:
            self.metrics.truncated.labels(self.name).inc(len(truncated))
            request.state.log["truncated"] = len(truncated)
        return Embedded(rows, lengths, truncated)

    def prompt(self, name: str | None) -> str:
        """The text put before each input: prompt `name`, else the model's default prompt,
        as `Encoder.encode` chooses it (so served rows equal Encoder.encode's)."""
        enc = self.encoder
        try:
            return resolve_prompt(enc.prompts, enc.default_prompt_name, prompt_name=name)
        except ConventionError as exc:
            raise ApiError(400, f"{exc} (model {self.name!r})", param="prompt_name") from None

    def finish(self, rows: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
        """Raw rows cut to `dimensions` (if given), then made unit length if `normalize`."""
        if dimensions is None and not normalize:
            return rows
        return truncate_dims(rows, dimensions or self.encoder.embedding_dim, normalize)


def create_app(models: Mapping[str, Encoder], settings: ServeSettings | None = None) -> FastAPI:
    """An ASGI app serving each Encoder under its name.

    The handlers are module-level routes (`router`, tei.py's routes) that find what they
    serve on `app.state`: `models` ({name: ServedModel}), `settings`, `metrics`, `ready`,
    `stopping` and the API keys' digests."""
    settings = settings or ServeSettings()
    if not models:
        raise ValueError("create_app needs at least one model")
    for key in settings.api_keys:
        check_api_key(key, "ServeSettings.api_keys")
    metrics = ServeMetrics()
    tokenizing = asyncio.Semaphore(1)
    served = {
        name: ServedModel(name, enc, settings, metrics, tokenizing) for name, enc in models.items()
    }
    app = FastAPI(title="diffcse-serve", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.models, app.state.settings, app.state.metrics = served, settings, metrics
    app.state.key_digests = [_digest(k.encode()) for k in settings.api_keys]
    app.state.ready = False
    app.state.stopping = stopping = Stopping()  # set by the CLI's server when a stop begins
    _install_error_handlers(app)
    from diffcse_runtime.serve import tei  # it builds on this module's checks

    app.include_router(tei.router(served, settings, AUTHORIZED))
    app.include_router(router)
    app.add_middleware(
        RequestGate,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        paths=PATHS | tei.paths(served),
        access=Access(settings.allowed_hosts, settings.cors_origins),
        stopping=stopping,
        body_timeout_s=settings.body_timeout_s,
    )
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start each model's batcher before the first request; stop them at shutdown."""
    served: Mapping[str, ServedModel] = app.state.models
    app.state.stopping.bind()
    for model in served.values():
        await model.batcher.start()
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False
        for model in served.values():
            await model.batcher.stop()


# ------------------------------------------------------------------ routes


async def authorize(request: Request, authorization: str | None = Header(default=None)) -> None:
    """A dependency refusing requests without one of the server's API keys (none
    configured: all pass)."""
    expected: list[bytes] = request.app.state.key_digests
    if not expected:
        return
    if not authorization:
        raise ApiError(
            401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
        )
    scheme, _, token = authorization.partition(" ")
    bearer = scheme.lower() == "bearer"  # header values arrive decoded as latin-1
    given = token.strip().encode("latin-1", "replace") if bearer else b""
    ok = False
    for key in expected:  # digests of equal length: time tells neither key nor length
        ok |= hmac.compare_digest(_digest(given), key)
    if not ok:
        raise ApiError(401, "the API key is not valid", code="invalid_api_key")


AUTHORIZED = Depends(authorize)
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 503)
}


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """A request body's OpenAPI entry: the handlers read the raw body themselves."""
    schema = {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}
    return {"required": True, "content": {"application/json": schema}}


router = APIRouter()


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=ERRORS,
    openapi_extra={"requestBody": _schema_of(EmbeddingRequest)},
)
async def embeddings(request: Request, _: None = AUTHORIZED) -> Response:
    """Embed `input` with `model` (OpenAI's request and response schema)."""
    settings: ServeSettings = request.app.state.settings
    body = _parse_body(await request.body())
    model = _pick_model(request.app.state.models, body.model)
    texts, single = _check_inputs(body.input, settings.max_inputs)
    dimensions = check_dimensions(model, body.dimensions)
    out = await model.embed(
        texts, request, truncate=settings.truncate, single=single, prompt_name=body.prompt_name
    )
    rows = model.finish(out.rows, dimensions, model.normalized)
    payload = render_embeddings(rows, body.encoding_format, model.name, out.lengths, out.truncated)
    return Response(payload, media_type="application/json", headers=out.headers())


@router.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
async def list_models(request: Request, _: None = AUTHORIZED) -> ModelList:
    return ModelList(data=[m.card for m in request.app.state.models.values()])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(request: Request, model_id: str, _: None = AUTHORIZED) -> ModelCard:
    """One model's card (the openai client's `models.retrieve`)."""
    return _pick_model(request.app.state.models, model_id).card


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: every model is loaded and its workers run."""
    if not request.app.state.ready:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse({"status": "ready", "models": list(request.app.state.models)})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    metrics: ServeMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


# ------------------------------------------------------------------ request checks


def _parse_body(raw: bytes) -> EmbeddingRequest:
    """The request body as JSON whatever its Content-Type (curl -d sends a form type)."""
    try:
        return EmbeddingRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _pick_model(served: Mapping[str, ServedModel], name: str | None) -> ServedModel:
    names = ", ".join(served)
    if name is None:
        if len(served) == 1:
            return next(iter(served.values()))
        raise ApiError(400, f"model is required: this server serves {names}", param="model")
    if name not in served:
        raise ApiError(
            404,
            f"model {name!r} is not served here (served: {names})",
            param="model",
            code="model_not_found",
        )
    return served[name]


def _check_inputs(
    value: str | list[Any],
    max_inputs: int,
    field: str = "input",
    token_hint: str = TOKEN_ARRAY_HINT,
) -> tuple[list[str], bool]:
    """The texts of `field`, or a 400/413 naming the item at fault."""
    if isinstance(value, str):
        if not value:
            raise ApiError(400, f"{field} is an empty string", param=field)
        return [value], True
    if not value:
        raise ApiError(400, f"{field} is an empty list; send at least one string", param=field)
    if len(value) > max_inputs:
        raise ApiError(
            413,
            f"{field} has {len(value)} items, over this server's limit of {max_inputs} per "
            "request; split it",
            param=field,
            code="too_many_inputs",
        )
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        raise ApiError(400, f"{field} is a token array; {token_hint}", param=field)
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, str):
            if isinstance(item, list):
                raise ApiError(400, f"{where} is a token array; {token_hint}", param=where)
            raise ApiError(400, f"{where} is {type(item).__name__}, expected a string", param=where)
        if not item:
            raise ApiError(400, f"{where} is an empty string", param=where)
    return list(value), False


def check_dimensions(model: ServedModel, dimensions: int | None) -> int | None:
    """`dimensions` as a width to cut to (None: the whole vector), or a 400 naming it."""
    if dimensions is None:
        return None
    try:
        return check_dim(dimensions, model.encoder.embedding_dim, "dimensions")
    except ConventionError as exc:
        raise ApiError(400, f"{exc} (model {model.name!r})", param="dimensions") from None


def _where(field: str, single: bool):
    """How a refusal names input i: the field alone for a single string, else field[i]."""
    return lambda i: field if single else f"{field}[{i}]"


def _check_lengths(
    model: ServedModel, counts: TokenCounts, truncate: bool, where, remedy: str
) -> list[int]:
    """Indices of the inputs the model will not read whole (over the token limit, or cut
    at the characters read per text); a 400 for the first one if cutting is not allowed."""
    cut = [int(i) for i in np.flatnonzero(counts.truncated)]
    if cut and not truncate:
        i = cut[0]
        if counts.cut_only[i]:
            why = (
                f"{where(i)} is longer than the {counts.cut_chars} characters model "
                f"{model.name!r} reads of one text, and has fewer than {model.limit} tokens "
                "within them (a long run of whitespace or one very long word): the rest "
                "would not be embedded"
            )
        else:
            bound = "at least " if counts.windowed[i] else ""
            why = (
                f"{where(i)} has {bound}{int(counts.counts[i])} tokens, over the limit of "
                f"{model.limit} of model {model.name!r}"
            )
        raise ApiError(400, f"{why}; {remedy}", param=where(i), code="context_length_exceeded")
    return cut


# ------------------------------------------------------------------ responses


def render_embeddings(
    rows: np.ndarray, encoding: str, model: str, lengths: list[int], truncated: list[int]
) -> bytes:
    """OpenAI's response JSON; base64 is little-endian float32, as the openai client decodes."""
    if encoding == "base64":
        little = np.ascontiguousarray(rows, dtype="<f4")
        vectors: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        vectors = rows.tolist()
    tokens = int(sum(lengths))
    body: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    if truncated:
        body["truncated"] = truncated
    return json.dumps(body, separators=(",", ":")).encode()


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error JSON, with the status the error calls for."""

    @app.exception_handler(HTTPException)
    async def on_http(_request: Request, exc: HTTPException) -> JSONResponse:
        if not isinstance(exc, ApiError):
            exc = ApiError(exc.status_code, str(exc.detail), headers=exc.headers)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(Exception)
    async def on_crash(_request: Request, exc: Exception) -> JSONResponse:
        log.error('{"error":"%s"}', type(exc).__name__)  # the type only: no request content
        error = ApiError(500, "internal error while embedding", type="server_error")
        return JSONResponse(error.body(), status_code=500)


def _validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """One sentence from pydantic's error list, naming the request field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON")
    if not loc:
        return ApiError(400, "the request body must be a JSON object with an 'input' field")
    name = loc[0]
    if name == "input":
        message = "input must be a string or a list of strings"
        if first.get("type") == "missing":
            message = "input is required"
        return ApiError(400, message, param="input")
    return ApiError(400, f"{name}: {first.get('msg', 'invalid value')}", param=name)
