"""The FastAPI app: OpenAI's /v1/embeddings and /v1/models, health, readiness and metrics.

`create_app({name: Encoder}, ServeSettings())` returns an ASGI app for uvicorn (or any ASGI
server). Requests are checked (inputs, model, token limits, key) so every refusal is one
OpenAI-style error naming the field at fault; accepted texts go to the model's `Batcher`,
which merges concurrent requests into shared onnxruntime runs. The
text-embeddings-inference routes (`tei.py`) share the key check, the limits and
`ServedModel.embed`, the one path from texts to rows (`served.py`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from diffcse_runtime.encoder import Encoder
from diffcse_runtime.serve import tei
from diffcse_runtime.serve.gate import Access, ApiError, RequestGate, Stopping, check_api_key, log
from diffcse_runtime.serve.metrics import ServeMetrics
from diffcse_runtime.serve.schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from diffcse_runtime.serve.served import (
    ServedModel,
    ServeSettings,
    check_dimensions,
    check_inputs,
    schema_of,
)

PATHS = {"/v1/embeddings", "/v1/models", "/health", "/ready", "/metrics"}


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


router = APIRouter()


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=ERRORS,
    openapi_extra={"requestBody": schema_of(EmbeddingRequest)},
)
async def embeddings(request: Request, _: None = AUTHORIZED) -> Response:
    """Embed `input` with `model` (OpenAI's request and response schema)."""
    settings: ServeSettings = request.app.state.settings
    body = _parse_body(await request.body())
    model = _pick_model(request.app.state.models, body.model)
    texts, single = check_inputs(body.input, settings.max_inputs)
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
