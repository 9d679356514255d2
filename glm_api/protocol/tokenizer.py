"""vLLM's wire shapes for /v1/tokenize and /v1/detokenize (served beside the OpenAI routes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glm_api.protocol.common import JsonWireModel
from glm_api.protocol.openai import ChatMessageIn, TokenIds, ToolDef


def _one_of_prompt_or_messages(schema: dict[str, Any]) -> None:
    """The spec states ``_one_of``: a string prompt (and no tools or template options), or a list
    of messages."""
    no_tools = {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}
    schema["oneOf"] = [
        {
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string"}, "messages": {"type": "null"}, "tools": no_tools,
                "chat_template_kwargs": {"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0}]},
            },
        },
        {"required": ["messages"], "properties": {"prompt": {"type": "null"}, "messages": {"type": "array"}}},
    ]


class TokenizeRequest(JsonWireModel):
    """Either ``prompt`` (plain text) or ``messages`` (a conversation, through the chat
    template with the generation prompt, and ``tools`` if given: what a chat request costs)."""

    model_config = ConfigDict(json_schema_extra=_one_of_prompt_or_messages)

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


class DetokenizeRequest(JsonWireModel):
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
