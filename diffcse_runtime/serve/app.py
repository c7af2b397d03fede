"""The FastAPI app: OpenAI's /v1/embeddings and /v1/models, health, readiness and metrics.

`create_app({name: Encoder}, ServeSettings())` returns an ASGI app for uvicorn (or any ASGI
server). Requests are checked here (inputs, model, token limits, key) so every refusal is
one OpenAI-style error naming the field at fault; accepted texts go to the model's
`Batcher`, which merges concurrent requests into shared onnxruntime runs.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from diffcse_runtime.encoder import Encoder
from diffcse_runtime.model_dir import MODEL_FILE
from diffcse_runtime.serve.batching import Batcher, BatchSettings, QueueFull
from diffcse_runtime.serve.gate import ApiError, RequestGate, log
from diffcse_runtime.serve.metrics import ServeMetrics
from diffcse_runtime.serve.schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

INLINE_CHARS = 16_384  # requests with more text are tokenized off the event loop
PATHS = {"/v1/embeddings", "/v1/models", "/health", "/ready", "/metrics"}


@dataclass
class ServeSettings:
    """Limits and behaviour of one server (the diffcse-serve options)."""

    api_keys: tuple[str, ...] = ()
    max_inputs: int = 2048
    max_body_bytes: int = 8 * 1024 * 1024
    truncate: bool = False
    retry_after_s: int = 1
    batch: BatchSettings = field(default_factory=BatchSettings)


class TokenCounter:
    """Token counts of texts as the model reads them, and the full count of any text that
    the model would cut (so a 400 can say how long it is)."""

    def __init__(self, encoder: Encoder) -> None:
        self.limit = encoder.max_seq_length
        self._model = encoder.tokenizer  # truncates at the limit, as Encoder.encode does
        self._full = Tokenizer.from_str(encoder.tokenizer.to_str())
        self._full.no_truncation()
        self._full.no_padding()

    def count(self, texts: list[str]) -> tuple[list[int], dict[int, int]]:
        """(tokens read per text, {index: full count} of the texts over the limit)."""
        lengths = [len(e.ids) for e in self._model.encode_batch(texts)]
        at_limit = [i for i, n in enumerate(lengths) if n >= self.limit]
        over: dict[int, int] = {}
        if at_limit:
            full = self._full.encode_batch([texts[i] for i in at_limit])
            counts = zip(at_limit, (len(e.ids) for e in full), strict=True)
            over = {i: n for i, n in counts if n > self.limit}
        return lengths, over


class ServedModel:
    """One model under its name: encoder, token counter and batcher."""

    def __init__(self, name: str, encoder: Encoder, settings: ServeSettings, metrics) -> None:
        self.name = name
        self.encoder = encoder
        self.counter = TokenCounter(encoder)
        self.batcher = Batcher(name, encoder, settings.batch, metrics)
        self.card = ModelCard(
            id=name,
            created=int(os.path.getmtime(encoder.path / MODEL_FILE)),
            embedding_dim=encoder.embedding_dim,
            max_input_tokens=encoder.max_seq_length,
        )


def create_app(models: Mapping[str, Encoder], settings: ServeSettings | None = None) -> FastAPI:
    """An ASGI app serving each Encoder under its name."""
    settings = settings or ServeSettings()
    if not models:
        raise ValueError("create_app needs at least one model")
    metrics = ServeMetrics()
    served = {name: ServedModel(name, enc, settings, metrics) for name, enc in models.items()}
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        for model in served.values():
            await model.batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for model in served.values():
                await model.batcher.stop()

    app = FastAPI(title="diffcse-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.models = served
    _install_error_handlers(app)
    app.add_middleware(
        RequestGate, metrics=metrics, max_body_bytes=settings.max_body_bytes, paths=PATHS
    )
    authorized = Depends(_key_check(settings.api_keys))
    errors: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 503)
    }

    @app.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=errors,
        openapi_extra={"requestBody": _schema_of(EmbeddingRequest)},
    )
    async def embeddings(request: Request, _: None = authorized) -> Response:
        """Embed `input` with `model` (OpenAI's request and response schema)."""
        body = _parse_body(await request.body())
        model = _pick_model(served, body.model)
        texts, single = _check_inputs(body.input, settings.max_inputs)
        _check_dimensions(model, body.dimensions)
        if sum(map(len, texts)) > INLINE_CHARS:
            lengths, over = await asyncio.to_thread(model.counter.count, texts)
        else:
            lengths, over = model.counter.count(texts)
        truncated = _check_lengths(model, over, settings.truncate, single)
        request.state.log = {"model": model.name, "inputs": len(texts), "tokens": sum(lengths)}
        metrics.in_flight.inc()
        try:
            rows = await model.batcher.embed(texts, lengths)
        except QueueFull:
            raise ApiError(
                503,
                f"the queue of model {model.name!r} is full; retry after "
                f"{settings.retry_after_s} s",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(settings.retry_after_s)},
            ) from None
        finally:
            metrics.in_flight.dec()
        metrics.inputs.labels(model.name).inc(len(texts))
        metrics.tokens.labels(model.name).inc(sum(lengths))
        if truncated:
            metrics.truncated.labels(model.name).inc(len(truncated))
            request.state.log["truncated"] = len(truncated)
        headers = {"X-Diffcse-Truncated": str(len(truncated))} if truncated else None
        payload = render_embeddings(rows, body.encoding_format, model.name, lengths, truncated)
        return Response(payload, media_type="application/json", headers=headers)

    @app.get("/v1/models", response_model=ModelList, responses={401: errors[401]})
    async def list_models(_: None = authorized) -> ModelList:
        return ModelList(data=[m.card for m in served.values()])

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: every model is loaded and its workers run."""
        if not state["ready"]:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "models": list(served)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


# ------------------------------------------------------------------ request checks


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}
    return {"required": True, "content": {"application/json": schema}}


def _parse_body(raw: bytes) -> EmbeddingRequest:
    """The request body as JSON whatever its Content-Type (curl -d sends a form type)."""
    try:
        return EmbeddingRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from None


def _key_check(keys: tuple[str, ...]):
    """A dependency refusing requests without one of `keys` (none configured: all pass)."""
    expected = [k.encode() for k in keys]

    async def check(authorization: str | None = Header(default=None)) -> None:
        if not expected:
            return
        if not authorization:
            raise ApiError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in expected:  # compare with every key, in constant time each
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise ApiError(401, "the API key is not valid", code="invalid_api_key")

    return check


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


def _check_inputs(value: str | list[Any], max_inputs: int) -> tuple[list[str], bool]:
    """The texts of `input`, or a 400/413 naming the item at fault."""
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "input is an empty string", param="input")
        return [value], True
    if not value:
        raise ApiError(400, "input is an empty list; send at least one string", param="input")
    if len(value) > max_inputs:
        raise ApiError(
            413,
            f"input has {len(value)} items, over this server's limit of {max_inputs} per "
            "request; split it",
            param="input",
            code="too_many_inputs",
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            kind = "a token array" if isinstance(item, (int, list)) else type(item).__name__
            raise ApiError(400, f"input[{i}] is {kind}, expected a string", param=f"input[{i}]")
        if not item:
            raise ApiError(400, f"input[{i}] is an empty string", param=f"input[{i}]")
    return list(value), False


def _check_dimensions(model: ServedModel, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != model.encoder.embedding_dim:
        raise ApiError(
            400,
            f"dimensions={dimensions} is not supported: model {model.name!r} gives "
            f"{model.encoder.embedding_dim}-dimensional embeddings and cannot shorten them",
            param="dimensions",
        )


def _check_lengths(
    model: ServedModel, over: dict[int, int], truncate: bool, single: bool
) -> list[int]:
    """Indices of the inputs the model will cut; a 400 for the first one if not allowed."""
    if over and not truncate:
        i = min(over)
        where = "input" if single else f"input[{i}]"
        raise ApiError(
            400,
            f"{where} has {over[i]} tokens, over the limit of {model.counter.limit} of model "
            f"{model.name!r}; shorten it, or start the server with --truncate",
            param=where,
            code="context_length_exceeded",
        )
    return sorted(over)


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
