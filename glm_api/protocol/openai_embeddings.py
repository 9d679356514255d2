"""Embeddings (/v1/embeddings): :class:`EmbeddingRequest` and :class:`EmbeddingResponse`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, field_validator

from glm_api.protocol.common import JsonWireModel, json_int
from glm_api.protocol.openai_inputs import check_texts_or_token_arrays, texts_or_token_arrays


class EmbeddingRequest(JsonWireModel):
    model: str | None = None
    input: texts_or_token_arrays()  # type: ignore[valid-type]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: json_int(ge=1) | None = None  # type: ignore[valid-type]
    user: str | None = None
    # Extras: the seed's normalize, and truncation instead of a 400 for over-long inputs.
    truncate: bool = False
    normalize: bool = False

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return check_texts_or_token_arrays(value, "input")


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
