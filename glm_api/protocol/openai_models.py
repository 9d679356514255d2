"""The model list (/v1/models): a :class:`ModelCard` per served model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm-api"
    # Ours, beside OpenAI's fields (the SDK keeps extras): what a client needs to size requests.
    kind: Literal["chat", "embedding", "rerank"]
    context_length: int | None = None
    dimensions: int | None = None
    #: The model this one runs over (vLLM's field): a LoRA adapter's or P-Tuning v2 prefix's base.
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
