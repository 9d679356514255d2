"""The OpenAI Responses API's request: ``POST /v1/responses`` with its tools, ``tool_choice``,
``text.format`` and ``reasoning``; the items of its ``input`` are in
:mod:`glm_api.protocol.responses_items`, re-exported here for the modules that import them
from the request.

Requests accept unknown fields (clients send newer ones) and ``null`` for optional ones, and
take JSON's types as they are in every nested model, as the chat models do. What this server
cannot do (built-in tools, images and files in the input, background runs) is refused by name
with a 400; the rules serving keeps across fields are stated in the spec.
(The response objects and streamed events: :mod:`glm_api.protocol.responses`.)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidatorFunctionWrapHandler, field_validator

from glm_api.protocol.common import (
    MAX_TOKENS_LIMIT,
    SEED_RANGE,
    JsonInt,
    JsonWireModel,
    RepetitionPenalty,
    Temperature,
    TopP,
    json_int,
    stated,
)
from glm_api.protocol.responses_items import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    ItemStatus,
    MessageItem,
    ReasoningItemIn,
    ReasoningText,
    SummaryText,
    join_text,
    model_by_type,
    raise_if_errors,
    validate_input_items,
)

__all__ = [
    "INCLUDABLE",
    "METADATA_KEYS",
    "METADATA_KEY_LENGTH",
    "METADATA_VALUE_LENGTH",
    "NO_TOP_LOGPROBS",
    "TEXT_FORMAT_MODELS",
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "FunctionTool",
    "FunctionToolChoice",
    "InputItem",
    "ItemStatus",
    "MessageItem",
    "Metadata",
    "ReasoningConfig",
    "ReasoningEffort",
    "ReasoningItemIn",
    "ReasoningText",
    "ResponseCreateRequest",
    "SummaryText",
    "TextConfig",
    "TextFormat",
    "TextFormatJsonObject",
    "TextFormatJsonSchema",
    "TextFormatText",
    "join_text",
]

#: ``reasoning.effort`` values OpenAI defines; a thinking template reads them, others ignore them.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


# ---------------------------------------------------------------------------------------------
# Request: tools, tool_choice, text format, reasoning


class FunctionTool(JsonWireModel):
    type: Literal["function"]  # required, as OpenAI's: the server names what it does not serve by it
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(JsonWireModel):
    type: Literal["function"] = "function"
    name: str


class TextFormatText(JsonWireModel):
    type: Literal["text"] = "text"


class TextFormatJsonObject(JsonWireModel):
    type: Literal["json_object"] = "json_object"


class TextFormatJsonSchema(JsonWireModel):
    type: Literal["json_schema"] = "json_schema"
    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")  # an object: serving compiles nothing else
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


TextFormat = Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")]
TEXT_FORMAT_MODELS: dict[str, type[BaseModel]] = {
    "text": TextFormatText, "json_object": TextFormatJsonObject, "json_schema": TextFormatJsonSchema,
}


class TextConfig(JsonWireModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("format", mode="wrap")
    @classmethod
    def _format_by_type(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, dict):
            return handler(value)  # null, a format already built, or the type error
        model, errors = model_by_type(value, TEXT_FORMAT_MODELS, "text formats")
        raise_if_errors(errors, "format")
        return model


class ReasoningConfig(JsonWireModel):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


def _check_tools(value: Any) -> Any:
    """Built-in tools (``web_search``...) refused by name; a tool without a type is the model's
    "field required"."""
    for i, tool in enumerate(value if isinstance(value, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind is not None and kind != "function":
            raise ValueError(f"tools[{i}]: tools of type {kind!r} are not supported; only function tools")
    return value


#: OpenAI's bounds on ``metadata``, stated in the spec and checked by ``_check_metadata``.
METADATA_KEYS, METADATA_KEY_LENGTH, METADATA_VALUE_LENGTH = 16, 64, 512
Metadata = Annotated[
    dict[str, str],
    stated(
        maxProperties=METADATA_KEYS, propertyNames={"maxLength": METADATA_KEY_LENGTH},
        additionalProperties={"type": "string", "maxLength": METADATA_VALUE_LENGTH},
    ),
]


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return value
    if len(value) > METADATA_KEYS:
        raise ValueError(f"metadata holds at most {METADATA_KEYS} keys")
    for key, text in value.items():
        if len(key) > METADATA_KEY_LENGTH or len(text) > METADATA_VALUE_LENGTH:
            raise ValueError(
                f"metadata keys are at most {METADATA_KEY_LENGTH} characters, values at most {METADATA_VALUE_LENGTH}"
            )
    return value


def _request_rules(schema: dict[str, Any]) -> None:
    """The spec states serving's rules across fields. The conversation is not empty: a string
    input, an item that becomes a chat message (reasoning items do not), instructions, or an
    earlier response to continue (``serving.responses.chat_request``). A forced call (tools with
    ``tool_choice`` required or named) is the output's grammar, so ``text.format`` asks for none
    (``openai_chat_call.chat_call``, as on chat completions)."""
    not_reasoning = {"not": {"required": ["type"], "properties": {"type": {"const": "reasoning"}}}}
    schema["allOf"] = [
        {"anyOf": [
            {"required": ["input"], "properties": {"input": {"type": "string"}}},
            {"required": ["input"], "properties": {"input": {"type": "array", "contains": not_reasoning}}},
            {"required": ["instructions"], "properties": {"instructions": {"type": "string", "minLength": 1}}},
            {"required": ["previous_response_id"], "properties": {"previous_response_id": {"type": "string"}}},
        ]},
        {"anyOf": [
            {"properties": {"tools": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}},
            {"properties": {"tool_choice": {"enum": ["none", "auto", None]}}},
            {"properties": {"text": {"anyOf": [
                {"type": "null"},
                {"properties": {"format": {"anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]}}},
            ]}}},
        ]},
    ]


#: No log-probabilities on this route: ``top_logprobs`` is refused unless 0 or null (the spec says so).
NO_TOP_LOGPROBS = stated(anyOf=[{"type": "integer", "minimum": 0, "maximum": 0}, {"type": "null"}])


#: The one ``include`` value served (reasoning is always given in plain text): the spec says so.
INCLUDABLE = stated(anyOf=[{"type": "array", "items": {"const": "reasoning.encrypted_content"}}, {"type": "null"}])


class ResponseCreateRequest(JsonWireModel):
    """JSON's types as they are (``background: 0`` is not ``false``), in every nested item too,
    as on the other OpenAI routes."""

    model_config = ConfigDict(json_schema_extra=_request_rules)

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: json_int(ge=1, le=MAX_TOKENS_LIMIT) | None = None  # type: ignore[valid-type]
    temperature: Temperature | None = None
    top_p: TopP | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = False
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Accepted and not needed here: tool-call limits are the model's, tiers are OpenAI's.
    max_tool_calls: json_int(ge=1) | None = None  # type: ignore[valid-type]
    service_tier: str | None = None
    # Not OpenAI, accepted as extras (as on chat completions).
    top_k: json_int(ge=0) | None = None  # type: ignore[valid-type]
    repetition_penalty: RepetitionPenalty | None = None
    seed: json_int(**SEED_RANGE) | None = None  # type: ignore[valid-type]
    # Refused: what this server does not do.
    background: Annotated[bool | None, stated(anyOf=[{"const": False}, {"type": "null"}])] = None
    conversation: Annotated[Any, stated(type="null")] = None
    prompt: Annotated[Any, stated(type="null")] = None
    top_logprobs: Annotated[JsonInt | None, NO_TOP_LOGPROBS] = None
    include: Annotated[list[str] | None, INCLUDABLE] = None

    @field_validator("input", mode="wrap")
    @classmethod
    def _input_shape(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return validate_input_items(value, handler)

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        return _check_tools(value)

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _named_choice(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, dict):
            return handler(value)
        model, errors = model_by_type(value, {"function": FunctionToolChoice}, "named tool choices", untyped="function")
        raise_if_errors(errors, "tool_choice")
        return model

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_metadata(value)

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not supported by this server")
        return value

    @field_validator("conversation", "prompt")
    @classmethod
    def _not_supported(cls, value: Any, info) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported on /v1/responses by this server")
        return value

    @field_validator("include")
    @classmethod
    def _includable(cls, value: list[str] | None) -> list[str] | None:
        # Reasoning text is always included in plain text (nothing is encrypted here), so
        # asking for its encrypted form asks for nothing more.
        wrong = [v for v in value or [] if v != "reasoning.encrypted_content"]
        if wrong:
            raise ValueError(f"include values {wrong} are not supported by this server")
        return value
