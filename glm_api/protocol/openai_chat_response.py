"""The chat answer: :class:`ChatCompletion`, and the :class:`ChatCompletionChunk` events of a streamed
one, with their messages, tool calls, deltas and logprobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from glm_api.protocol.openai_usage import OpenAIUsage


class FunctionCallOut(BaseModel):
    # The Responses API has a FunctionCallOut too, so the spec names both by module: this keeps
    # its component name, glm_api__protocol__openai__FunctionCallOut, as it was before the split.
    __module__ = "glm_api.protocol.openai"

    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None
    #: The model's thinking, under both names clients read (same text); null when it did not think.
    reasoning_content: str | None = None
    reasoning: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may hold part of a character)


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at this position, most likely first


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoiceOut(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoiceOut]
    usage: OpenAIUsage


class FunctionCallDelta(BaseModel):
    name: str | None = None  # on a call's first delta only
    arguments: str = ""


class ToolCallDelta(BaseModel):
    """A piece of a streamed call: the first carries its id, type and name (with no arguments
    yet, or all of them at once), the next ones more of its arguments' JSON text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None  # of the tokens this chunk carries


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: OpenAIUsage | None = None
