"""Typed request and response bodies of the OpenAI-compatible API.

They follow OpenAI's embeddings schema field for field, so the `openai` client (and anything
else written against that API) talks to `diffcse-serve` unchanged. Fields OpenAI does not
have are marked as diffcse extensions and are optional, so a strict client never sees them
unless it asked for behaviour that needs them (truncation).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. Unknown fields are ignored, as OpenAI's own server does."""

    model_config = ConfigDict(extra="ignore")

    # Items are checked by the handler, not by pydantic, so an error can name the index of a
    # bad item in one sentence ("input[3] is an integer ...") instead of a union's error list.
    input: str | list[Any] = Field(description="A string or a list of strings to embed.")
    model: str | None = Field(
        default=None, description="A served model name; optional when one model is served."
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float",
        description="float: JSON numbers; base64: little-endian float32 bytes, base64-encoded.",
    )
    dimensions: int | None = Field(
        default=None,
        description="Keep the first N dimensions (1 to the model's embedding size), "
        "renormalised to unit length when the server normalises.",
    )
    user: str | None = Field(default=None, description="Accepted and ignored (never logged).")
    prompt_name: str | None = Field(
        default=None,
        description="diffcse extension: one of the model's prompts (diffcse.json), put before "
        "each input; none: the model's default prompt, as Encoder.encode does.",
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the model read, special tokens included.")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
    truncated: list[int] | None = Field(
        default=None,
        description="diffcse extension, present only when the server truncated inputs: "
        "the indices of the inputs cut to the model's token limit.",
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffcse"
    embedding_dim: int = Field(description="diffcse extension: the embedding size.")
    max_input_tokens: int = Field(description="diffcse extension: the model's token limit.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: the client raises its typed exception (BadRequestError, ...)."""

    error: ErrorDetail
