"""What every route of the server shares: its settings, each served model, and the checks.

`ServedModel.embed` is the one path from texts to rows for the OpenAI routes (`app.py`) and
the text-embeddings-inference routes (`tei.py`); both word their refusals through the
checks here. Kept apart from `app.py` so that both route modules import it and neither
imports the other's module back.
"""

from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel

from diffcse_runtime.conventions import ConventionError, check_dim, resolve_prompt, truncate_dims
from diffcse_runtime.encoder import Encoder
from diffcse_runtime.model_dir import MODEL_FILE
from diffcse_runtime.serve.batching import Batcher, BatchSettings, QueueFull
from diffcse_runtime.serve.gate import LOOPBACK_HOSTS, ApiError
from diffcse_runtime.serve.schemas import ModelCard
from diffcse_runtime.truncation import TokenCounts

INLINE_CHARS = 16_384  # requests with more text are tokenized off the event loop
# Server-wide memory of tokenizing: requests over INLINE_CHARS are tokenized one at a time,
# in tokenizers calls of TOKENIZE_CHUNK_CHARS characters at up to ~250 bytes each.
TOKENIZING_BYTES = 64 * 2**20
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


# ------------------------------------------------------------------ request checks


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """A request body's OpenAPI entry: the handlers read the raw body themselves."""
    schema = {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}
    return {"required": True, "content": {"application/json": schema}}


def check_inputs(
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
