"""vLLM's wire shapes for /v1/tokenize and /v1/detokenize (served beside the OpenAI routes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from glm_api.protocol.common import WireModel
from glm_api.protocol.openai import ChatMessageIn, TokenIds, ToolDef


class TokenizeRequest(WireModel):
    """Either ``prompt`` (plain text) or ``messages`` (a conversation, through the chat
    template with the generation prompt, and ``tools`` if given: what a chat request costs)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    tools: list[ToolDef] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # as on chat requests (enable_thinking, ...)

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if (self.tools or self.chat_template_kwargs) and self.messages is None:
            raise ValueError("tools and chat_template_kwargs only apply to messages")
        return self


class TokenizeResponse(BaseModel):
    model: str
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeRequest(WireModel):
    model: str | None = None
    tokens: TokenIds

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError("token ids must not be negative")
        return value


class DetokenizeResponse(BaseModel):
    model: str
    prompt: str
