"""Hugging Face text-embeddings-inference (TEI) routes: /info, /embed (also at POST / and
/invocations, as TEI has it), /embed_all, /similarity, /tokenize and /decode, with TEI's
request and response schemas and its error body.

TEI clients (`tei-client` reads `/info` first; huggingface_hub's InferenceClient posts to
the URL itself) get a second face of the same server: the API key check, the limits, the
`Batcher`, the prompts and the metrics are those of `/v1/embeddings`, through
`ServedModel.embed`, the one path from texts to rows. Only the wording differs: TEI's field
names (`inputs`), its error body `{"error": "...", "error_type": "validation"}` and its
statuses (413 for limits, 429 when overloaded, 424 for what the model cannot do).

A TEI server serves one model. With one model served the routes sit at the root (base URL
`http://HOST:PORT`); every model also has them under `/tei/NAME` (base URL
`http://HOST:PORT/tei/NAME`), which is the only way to reach each of several models.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from diffcse_runtime import __version__
from diffcse_runtime.encoder import similarity as cosine
from diffcse_runtime.serve.gate import ApiError, log
from diffcse_runtime.serve.served import (
    INLINE_CHARS,
    ServedModel,
    ServeSettings,
    check_dimensions,
    check_inputs,
    schema_of,
)
from diffcse_runtime.truncation import TOKENIZE_CHUNK_CHARS

ROUTES = ("/info", "/embed", "/embed_all", "/tokenize", "/decode", "/similarity", "/invocations")
TEI_PREFIX = "/tei"
DTYPES = {"fp32": "float32", "optimized": "float32", "fp16": "float16", "int8": "int8"}
# TEI's error_type per status; codes of the shared checks that TEI answers differently
KINDS = {400: "validation", 401: "unauthorized", 404: "not_found", 413: "validation"}
KINDS |= {422: "validation", 424: "backend", 429: "overloaded", 503: "unhealthy"}
REMAP = {"queue_full": (429, "overloaded"), "context_length_exceeded": (413, "validation")}
# /tokenize answers every token, untruncated: one tokenizers call of at most the encoder's
# own chunk (its memory bound), whose answer (~100 bytes of JSON a token) stays bounded too
TOKENIZE_MAX_CHARS = TOKENIZE_CHUNK_CHARS
TRUNCATE_REMEDY = 'shorten it, or send "truncate": true'
LEFT_REMEDY = (
    'truncation_direction "Left" is not supported (this server keeps the first tokens of a '
    'text); shorten it, or send truncation_direction "Right"'
)


# ------------------------------------------------------------------ request bodies


class _Body(BaseModel):
    """Strict JSON types (no "true" for true); unknown fields ignored, as TEI does."""

    model_config = ConfigDict(extra="ignore", strict=True)


class _Texts(_Body):
    inputs: str | list[Any] = Field(
        description="A string, token ids, or a list of strings and/or token id lists."
    )
    prompt_name: str | None = Field(
        default=None, description="A key of the model's prompts; its text is put first."
    )


class _Truncation(_Body):
    truncate: bool | None = Field(
        default=None, description="Cut texts over the token limit (null: the server's --truncate)."
    )
    truncation_direction: Literal["left", "right"] = Field(
        default="right", description="Right keeps a text's first tokens (Left is refused)."
    )

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # TEI writes "Right"


class _Embedding(_Truncation, _Texts):
    pass


class EmbedRequest(_Embedding):
    """POST /embed."""

    normalize: bool = Field(default=True, description="Unit-length vectors.")
    dimensions: int | None = Field(
        default=None, description="Keep the first N dimensions (renormalised if normalize)."
    )
    # huggingface_hub passes it on when asked: refused rather than ignored (floats only here)
    encoding_format: Literal["float"] = "float"


class EmbedAllRequest(_Embedding):
    """POST /embed_all."""


class _SimilarityInputs(_Body):
    source_sentence: str
    sentences: list[str]


class _SimilarityParameters(_Truncation):
    prompt_name: str | None = None


class SimilarityRequest(_Body):
    """POST /similarity (the Hugging Face Inference API's sentence-similarity task)."""

    inputs: _SimilarityInputs
    parameters: _SimilarityParameters | None = None


class TokenizeRequest(_Texts):
    """POST /tokenize."""

    add_special_tokens: bool = True


class DecodeRequest(_Body):
    """POST /decode."""

    ids: list[int] | list[list[int]]
    skip_special_tokens: bool = True


# ------------------------------------------------------------------ errors


def _tei_error(exc: HTTPException) -> JSONResponse:
    """An error in TEI's body and status; the message is the shared check's sentence."""
    status = exc.status_code
    kind = getattr(exc, "type", None)
    if kind not in KINDS.values() and kind != "empty":
        kind = KINDS.get(status, "backend" if status >= 500 else "validation")
    status, kind = REMAP.get(getattr(exc, "code", None) or "", (status, kind))
    body = {"error": str(exc.detail), "error_type": kind}
    return JSONResponse(body, status_code=status, headers=exc.headers)


class TeiRoute(APIRoute):
    """A route whose refusals, the key check's included, leave in TEI's error body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                return _tei_error(exc)
            except Exception as exc:  # the type only: no request content in the log
                log.error('{"error":"%s"}', type(exc).__name__)
                return JSONResponse(
                    {"error": "internal error while embedding", "error_type": "backend"},
                    status_code=500,
                )

        return route


def _parse(kind: type[BaseModel], raw: bytes) -> Any:
    """The body as `kind` whatever its Content-Type, or a 422 naming the field at fault."""
    try:
        return kind.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(422, "the request body is not valid JSON") from None
        loc = [str(p) for p in first["loc"]]
        if not loc:
            raise ApiError(422, "the request body must be a JSON object") from None
        if loc[0] == "inputs":
            message = "inputs must be a string, a list of strings, or token ids"
            raise ApiError(422, message, param="inputs") from None
        raise ApiError(422, f"{loc[0]}: {first['msg']}", param=loc[0]) from None


# ------------------------------------------------------------------ inputs


def _check_ids(model: ServedModel, ids: list[Any], where: str) -> list[int]:
    """`ids` if each is a token id of the model's tokenizer, else a 400 naming the first."""
    vocab = model.encoder.tokenizer.get_vocab_size(with_added_tokens=True)
    if not ids:
        raise ApiError(400, f"{where} is an empty list of token ids", type="empty")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ApiError(
                400,
                f"{where}[{i}] must be a token id of model {model.name!r} (0 to {vocab - 1}), "
                f"got {token!r}",
            )
    return ids


def _decode_ids(model: ServedModel, ids: list[Any], where: str) -> str:
    """TEI takes token ids of the model's own tokenizer as input: they are embedded as the
    text they decode to (special tokens dropped: the model adds its own), as TEI does."""
    return model.encoder.tokenizer.decode(_check_ids(model, ids, where), skip_special_tokens=True)


def _texts(model: ServedModel, inputs: str | list[Any], settings: ServeSettings):
    """TEI's `inputs` (a string, one id list, or a list of strings and id lists) as the
    checked texts and whether one string was sent."""
    if not inputs:
        raise ApiError(400, "inputs is empty; send a string or a list of strings", type="empty")
    if isinstance(inputs, list):
        if all(isinstance(x, int) and not isinstance(x, bool) for x in inputs):
            inputs = _decode_ids(model, inputs, "inputs")
        else:
            inputs = [
                _decode_ids(model, item, f"inputs[{i}]") if isinstance(item, list) else item
                for i, item in enumerate(inputs)
            ]
    return check_inputs(inputs, settings.max_inputs, field="inputs")


def _prompt(model: ServedModel, name: str | None) -> str:
    """The text put first: prompt `name`, else the model's default prompt (`ServedModel.
    prompt`). An unknown name lists the model's prompts in TEI's words, which
    `tei-client`'s prompt_names() reads back."""
    prompts = model.encoder.prompts
    if name is not None and name not in prompts:
        if not prompts:
            message = f"prompt_name {name!r}: model {model.name!r} has no prompts"
            raise ApiError(400, message, param="prompt_name")
        known = ", ".join(json.dumps(p) for p in prompts)
        raise ApiError(
            400,
            f"prompt_name {name!r} is not a prompt of model {model.name!r}. "
            f"Available prompts: [{known}]",
            param="prompt_name",
        )
    return model.prompt(name)


async def _embed(
    model: ServedModel, request: Request, texts: list[str], single: bool, body, settings
):
    """Texts through the shared path with TEI's prompt and truncation fields applied: a
    request's `truncate` (null: the server's --truncate); a cut from the left is refused."""
    _prompt(model, body.prompt_name)  # TEI's wording for an unknown name
    truncate = settings.truncate if body.truncate is None else body.truncate
    remedy = TRUNCATE_REMEDY
    if truncate and body.truncation_direction == "left":
        truncate, remedy = False, LEFT_REMEDY  # a cut from the left is refused, not faked
    return await model.embed(
        texts,
        request,
        truncate=truncate,
        single=single,
        field="inputs",
        remedy=remedy,
        prompt_name=body.prompt_name,
    )


async def _embed_route(
    model: ServedModel, request: Request, raw: bytes, settings: ServeSettings
) -> Response:
    body = _parse(EmbedRequest, raw)
    texts, single = _texts(model, body.inputs, settings)
    dimensions = check_dimensions(model, body.dimensions)
    out = await _embed(model, request, texts, single, body, settings)
    rows = model.finish(out.rows, dimensions, body.normalize)
    return _json(rows.tolist(), out.headers())


async def _similarity_route(
    model: ServedModel, request: Request, raw: bytes, settings: ServeSettings
) -> Response:
    body = _parse(SimilarityRequest, raw)
    if not body.inputs.sentences:
        raise ApiError(400, "inputs.sentences is an empty list", type="empty")
    texts = [body.inputs.source_sentence, *body.inputs.sentences]
    texts, _ = check_inputs(texts, settings.max_inputs, field="inputs")
    parameters = body.parameters or _SimilarityParameters()
    out = await _embed(model, request, texts, False, parameters, settings)
    return _json(cosine(out.rows[:1], out.rows[1:])[0].tolist(), out.headers())


# ------------------------------------------------------------------ responses


def info(model: ServedModel, settings: ServeSettings) -> dict[str, Any]:
    """TEI's /info for `model`. A request holds at least one text, so at most `max_queue`
    requests can wait: that is the bound TEI calls max_concurrent_requests."""
    meta = model.encoder.meta
    return {
        "model_id": model.name,
        "model_sha": meta.onnx_sha256 or None,
        "model_dtype": DTYPES.get(meta.variant, "float32"),
        "model_type": {"embedding": {"pooling": meta.pooling}},
        "max_concurrent_requests": settings.batch.max_queue,
        "max_input_length": model.encoder.max_seq_length,
        "max_batch_tokens": settings.batch.max_batch_tokens,
        "max_batch_requests": None,
        "max_client_batch_size": settings.max_inputs,
        "auto_truncate": settings.truncate,
        "tokenization_workers": 1,
        "version": __version__,
        "sha": None,
        "docker_label": None,
        "embedding_dim": model.encoder.embedding_dim,  # diffcse extension
    }


def _json(value: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(value, separators=(",", ":")).encode()
    return Response(body, media_type="application/json", headers=headers)


def _byte_offsets(text: str) -> np.ndarray:
    """UTF-8 byte offset of every character position (TEI's start/stop count bytes)."""
    if text.isascii():
        return np.arange(len(text) + 1)
    sizes = np.fromiter((len(c.encode("utf-8", "surrogatepass")) for c in text), np.int64)
    return np.concatenate(([0], np.cumsum(sizes)))


def _tokenize_all(tokenizer: Tokenizer, texts: list[str], special: bool) -> list[list[dict]]:
    encodings = tokenizer.encode_batch(texts, add_special_tokens=special)
    return [_tokens(text, e) for text, e in zip(texts, encodings, strict=True)]


def _tokens(text: str, encoding) -> list[dict[str, Any]]:
    """TEI's SimpleToken list: special tokens by name, others by their span of the text."""
    at = _byte_offsets(text)
    out = []
    for token_id, token, (start, stop), special in zip(
        encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask, strict=True
    ):
        if special:
            out.append(
                {"id": token_id, "text": token, "special": True, "start": None, "stop": None}
            )
        else:
            span = {"start": int(at[start]), "stop": int(at[stop])}
            out.append({"id": token_id, "text": text[start:stop], "special": False, **span})
    return out


# ------------------------------------------------------------------ routes


class _TeiModel:
    """What the TEI routes keep per model: a tokenizer that does not truncate (/tokenize
    shows every token)."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.tokenizer = Tokenizer.from_str(model.encoder.tokenizer.to_str())
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()


def _several(names: list[str]) -> ApiError:
    bases = ", ".join(f"{TEI_PREFIX}/{n}" for n in names)
    return ApiError(
        400,
        f"this server serves several models; the TEI routes of each are under its own base "
        f"URL: {bases}",
    )


def paths(served: Mapping[str, ServedModel]) -> set[str]:
    """Every TEI path, for the per-path request metrics."""
    out = set(ROUTES) | {"/"}
    for name in served:
        out |= {f"{TEI_PREFIX}/{name}{route}" for route in ("", *ROUTES)}
    return out


def router(served: Mapping[str, ServedModel], settings: ServeSettings, authorized) -> APIRouter:
    """The TEI routes of every model under /tei/NAME, and at the root when one is served."""
    api = APIRouter(route_class=TeiRoute, tags=["text-embeddings-inference"])
    models = {name: _TeiModel(model) for name, model in served.items()}
    root = next(iter(models.values())) if len(models) == 1 else None
    _add_routes(api, "", root, list(served), settings, authorized)
    for name, model in models.items():
        _add_routes(api, f"{TEI_PREFIX}/{name}", model, list(served), settings, authorized)
    return api


def _add_routes(
    api: APIRouter,
    prefix: str,
    tei: _TeiModel | None,
    names: list[str],
    settings: ServeSettings,
    authorized,
) -> None:
    """Register the five routes at `prefix` for one model (None: refuse, naming the bases)."""

    def pick() -> _TeiModel:
        if tei is None:
            raise _several(names)
        return tei

    @api.get(f"{prefix}/info")
    async def get_info(_: None = authorized) -> Response:
        """TEI's model info: what tei-client reads before it embeds."""
        return _json(info(pick().model, settings))

    async def embed(request: Request, _: None = authorized) -> Response:
        """Pooled embeddings, one row per input, through the same batcher as /v1/embeddings."""
        return await _embed_route(pick().model, request, await request.body(), settings)

    async def similarity(request: Request, _: None = authorized) -> Response:
        """Cosine similarity of `source_sentence` with each of `sentences`."""
        return await _similarity_route(pick().model, request, await request.body(), settings)

    async def task(request: Request, _: None = authorized) -> Response:
        """The Inference API's POST to the model URL (huggingface_hub's InferenceClient):
        sentence similarity when `inputs` is an object, else /embed, as TEI answers it."""
        raw = await request.body()
        try:
            is_pair = isinstance(json.loads(raw).get("inputs"), dict)
        except (ValueError, AttributeError):
            is_pair = False  # _parse words the error
        route = _similarity_route if is_pair else _embed_route
        return await route(pick().model, request, raw, settings)

    embed_body = {"requestBody": schema_of(EmbedRequest)}
    for path in (f"{prefix}/embed", f"{prefix}/invocations"):  # /invocations: SageMaker's
        api.add_api_route(path, embed, methods=["POST"], openapi_extra=embed_body)
    api.add_api_route(prefix or "/", task, methods=["POST"], openapi_extra=embed_body)
    similarity_body = {"requestBody": schema_of(SimilarityRequest)}
    api.add_api_route(
        f"{prefix}/similarity", similarity, methods=["POST"], openapi_extra=similarity_body
    )

    @api.post(f"{prefix}/embed_all", openapi_extra={"requestBody": schema_of(EmbedAllRequest)})
    async def embed_all(_: None = authorized) -> Response:
        """Token embeddings: the exported graph has only the pooled output, so TEI's 424."""
        model = pick().model
        raise ApiError(
            424,
            f"/embed_all is not available: model {model.name!r} was exported with its pooled "
            "sentence_embedding output only, not token embeddings; use /embed",
        )

    @api.post(f"{prefix}/tokenize", openapi_extra={"requestBody": schema_of(TokenizeRequest)})
    async def tokenize(request: Request, _: None = authorized) -> Response:
        """Every token of each input (not cut at the model's limit), with byte offsets."""
        tei = pick()
        body = _parse(TokenizeRequest, await request.body())
        texts, _single = _texts(tei.model, body.inputs, settings)
        prompt = _prompt(tei.model, body.prompt_name)
        texts = [prompt + t for t in texts] if prompt else texts
        chars = sum(map(len, texts))
        if chars > TOKENIZE_MAX_CHARS:
            raise ApiError(
                413,
                f"inputs hold {chars} characters, over the {TOKENIZE_MAX_CHARS} this server "
                "tokenizes in one /tokenize request; split them",
            )
        special = body.add_special_tokens
        work = partial(_tokenize_all, tei.tokenizer, texts, special)
        if chars <= INLINE_CHARS:
            return _json(work())
        async with tei.model.tokenizing:  # the server's one large tokenizing at a time
            return _json(await asyncio.to_thread(work))

    @api.post(f"{prefix}/decode", openapi_extra={"requestBody": schema_of(DecodeRequest)})
    async def decode(request: Request, _: None = authorized) -> Response:
        """Token ids back to text, one string per id list."""
        tei = pick()
        body = _parse(DecodeRequest, await request.body())
        if not body.ids:
            raise ApiError(400, "ids is an empty list", type="empty")
        flat = not isinstance(body.ids[0], list)
        batch = [body.ids] if flat else body.ids
        if len(batch) > settings.max_inputs:
            raise ApiError(
                413,
                f"ids has {len(batch)} lists, over this server's limit of "
                f"{settings.max_inputs} per request; split it",
            )
        skip = body.skip_special_tokens
        texts = [
            tei.tokenizer.decode(_check_ids(tei.model, ids, "ids" if flat else f"ids[{i}]"), skip)
            for i, ids in enumerate(batch)
        ]
        return _json(texts)
