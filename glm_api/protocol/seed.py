"""The seed GLM-API's wire shapes: /chat, /embedding, /tokenize, /models.

Field names and defaults are the seed's (``chunk``, ``prompt``, ``tokenIds``, ...); its
existing clients depend on them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glm_api.protocol.common import (
    MaxTokens,
    SEED_RANGE,
    RepetitionPenalty,
    Stop,
    Temperature,
    TopP,
    Usage,
    WireModel,
    stated,
)


def _content_is_required(schema: dict[str, Any]) -> None:
    """The spec states what serving enforces for every seed role (the seed has no tool_calls,
    so an assistant turn is text too): content is a string, present and not null."""
    schema["properties"]["content"] = {"type": "string", "title": "Content"}
    schema["required"] = [*schema.get("required", []), "content"]


class SeedMessage(WireModel):
    model_config = ConfigDict(json_schema_extra=_content_is_required)

    role: Literal["system", "user", "assistant", "observation", "function", "tool"]
    content: str | None = None  # required: serving refuses it missing or null, naming messages[i].content
    metadata: str | None = None
    tools: list[dict[str, Any]] | None = None
    name: str | None = None


class SeedChatRequest(WireModel):
    model: str | None = None
    messages: list[SeedMessage] = Field(min_length=1)
    stream: bool = False
    chunk: bool = True
    temperature: Temperature = 0.7
    top_p: TopP = 1.0
    max_tokens: MaxTokens | None = None  # None: the server's default_max_tokens (4096, the seed's)
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    repetition_penalty: RepetitionPenalty = 1.1
    seed: Annotated[int, Field(**SEED_RANGE)] | None = None
    return_function_call: bool = False

    @model_validator(mode="after")
    def _last_message_is_not_assistant(self) -> "SeedChatRequest":
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant: there is nothing to answer")
        return self


class SeedDelta(BaseModel):
    role: str | None = None
    content: str | None = None


class SeedChunkChoice(BaseModel):
    index: int = 0
    delta: SeedDelta
    finish_reason: str | None = None


class SeedChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[SeedChunkChoice]


class SeedResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class SeedChoice(BaseModel):
    index: int = 0
    message: SeedResponseMessage
    finish_reason: str | None


class SeedChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[SeedChoice]
    usage: Usage
    history: list[dict[str, Any]] | None = None


class SeedEmbeddingRequest(WireModel):
    model: str | None = None
    prompt: str | Annotated[list[str], stated(minItems=1)]
    normalize: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value


class SeedEmbeddingResponse(BaseModel):
    data: list[list[float]]
    model: str
    object: Literal["embedding"] = "embedding"
    usage: Usage


class SeedTokenizeRequest(WireModel):
    prompt: str
    max_tokens: MaxTokens = 4096
    model: str | None = None


class SeedTokenizeResponse(BaseModel):
    tokenIds: list[int]
    tokens: list[str]
    model: str
    object: Literal["tokenizer"] = "tokenizer"


class SeedModelCard(BaseModel):
    id: str
    object: Literal["embedding", "chat.completion", "rerank"]
    created: int
    owned_by: str = "owner"
    root: str | None = None
    parent: str | None = None
    permission: list | None = None
    # Ours, beside the seed's fields: what a client needs to size its requests.
    dimensions: int | None = None
    context_length: int | None = None


class SeedModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SeedModelCard]
