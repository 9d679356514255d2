"""The OpenAI Responses API's wire shapes: ``/v1/responses`` requests, response objects, the
items of ``input`` and ``output``, and the typed events of a streamed response.

Requests accept unknown fields (clients send newer ones) and ``null`` for optional ones, as
the chat models do. What this server cannot do (built-in tools, images and files in the input,
background runs) is refused by name with a 400. Responses mirror the ``openai`` package's
``openai.types.responses`` field for field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from glm_api.protocol.common import (
    MAX_TOKENS_LIMIT,
    SEED_RANGE,
    JsonInt,
    JsonWireModel,
    RepetitionPenalty,
    Temperature,
    TopP,
    WireModel,
    json_int,
    stated,
)

#: ``reasoning.effort`` values OpenAI defines; a thinking template reads them, others ignore them.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


# ---------------------------------------------------------------------------------------------
# Request: input items


def _text_of_parts(value: Any, allowed: tuple[str, ...], where: str) -> Any:
    """A string, or a list of text parts of the ``allowed`` types (images and files refused)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a string or a list of content parts")
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in allowed or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: content parts of type {kind!r} are not supported; only {', '.join(allowed)}")
    return value


def join_text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


class MessageItem(WireModel):
    """A message: ``content`` a string or ``input_text`` parts (``output_text`` for an
    assistant message an earlier response returned)."""

    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]
    status: ItemStatus | None = None

    @model_validator(mode="after")
    def _text_parts(self) -> MessageItem:
        allowed = ("output_text",) if self.role == "assistant" else ("input_text",)
        _text_of_parts(self.content, allowed, f"a {self.role} message")
        return self


class FunctionCallItem(WireModel):
    """A call the model made (as a previous response returned it)."""

    type: Literal["function_call"]  # required, so the spec tells the items apart (a message may omit it)
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    status: ItemStatus | None = None


class FunctionCallOutputItem(WireModel):
    """The client's result of running a call: ``output`` a string or ``input_text`` parts."""

    type: Literal["function_call_output"]  # required, so the spec tells the items apart (a message may omit it)
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]
    status: ItemStatus | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _text_output(cls, value: Any) -> Any:
        return _text_of_parts(value, ("input_text", "output_text"), "function_call_output.output")


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class SummaryText(BaseModel):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningItemIn(WireModel):
    """A reasoning item sent back (LangChain and agents replay the whole output). Earlier turns'
    thinking is not shown to the model again, as thinking chat templates do."""

    type: Literal["reasoning"]  # required, so the spec tells the items apart (a message may omit it)
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItemIn, Field(discriminator="type")]
INPUT_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _input_items(value: Any) -> Any:
    """``input``: a string (one user message) or a list of items; a message may omit ``type``."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("input must be a string or a list of input items")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"input[{i}] must be an object")
        kind = item["type"] if "type" in item else ("message" if "role" in item else None)
        if kind not in INPUT_ITEM_TYPES:
            raise ValueError(
                f"input[{i}]: items of type {kind!r} are not supported; only {', '.join(INPUT_ITEM_TYPES)}"
            )
        items.append({**item, "type": kind})
    return items


# ---------------------------------------------------------------------------------------------
# Request: tools, tool_choice, text format, reasoning


class FunctionTool(WireModel):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(WireModel):
    type: Literal["function"] = "function"
    name: str


class TextFormatText(WireModel):
    type: Literal["text"] = "text"


class TextFormatJsonObject(WireModel):
    type: Literal["json_object"] = "json_object"


class TextFormatJsonSchema(WireModel):
    type: Literal["json_schema"] = "json_schema"
    name: str = Field(max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")  # an object: serving compiles nothing else
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True, serialize_by_alias=True)


TextFormat = Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")]


class TextConfig(WireModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(WireModel):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


def _check_tools(value: Any) -> Any:
    for i, tool in enumerate(value or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise ValueError(f"tools[{i}]: tools of type {kind!r} are not supported; only function tools")
    return value


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return value
    if len(value) > 16:
        raise ValueError("metadata holds at most 16 keys")
    for key, text in value.items():
        if len(key) > 64 or len(text) > 512:
            raise ValueError("metadata keys are at most 64 characters, values at most 512")
    return value


#: No log-probabilities on this route: ``top_logprobs`` is refused unless 0 or null (the spec says so).
NO_TOP_LOGPROBS = stated(anyOf=[{"type": "integer", "minimum": 0, "maximum": 0}, {"type": "null"}])


#: The one ``include`` value served (reasoning is always given in plain text): the spec says so.
INCLUDABLE = stated(anyOf=[{"type": "array", "items": {"const": "reasoning.encrypted_content"}}, {"type": "null"}])


class ResponseCreateRequest(JsonWireModel):
    """JSON's types as they are (``background: 0`` is not ``false``), as on the other OpenAI routes."""

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
    metadata: dict[str, str] | None = None
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

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return _input_items(value)

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        return _check_tools(value)

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

    @model_validator(mode="after")
    def _input_not_empty(self) -> ResponseCreateRequest:
        if self.input == [] and self.previous_response_id is None:
            raise ValueError("input is empty")
        return self


# ---------------------------------------------------------------------------------------------
# Response: output items


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallOut(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningOut(BaseModel):
    """A thinking model's reasoning, in plain text (``content``); no summary is written."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: ItemStatus | None = None


OutputItem = Annotated[OutputMessage | FunctionCallOut | ReasoningOut, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseErrorInfo(BaseModel):
    """Why a response failed; ``code`` from OpenAI's list (the ``error`` event has ours)."""

    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: ResponseErrorInfo | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: ReasoningConfig = ReasoningConfig()
    store: bool = True
    temperature: float
    text: TextConfig
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice = "auto"
    tools: list[FunctionTool] = Field(default_factory=list)
    top_p: float
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    background: bool = False

    model_config = ConfigDict(serialize_by_alias=True)


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# ---------------------------------------------------------------------------------------------
# Input items as listed by GET /v1/responses/{id}/input_items


class InputText(BaseModel):
    type: Literal["input_text"] = "input_text"
    text: str


class InputMessageOut(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer"]
    status: ItemStatus = "completed"
    content: list[InputText]


class FunctionCallOutputOut(BaseModel):
    id: str
    type: Literal["function_call_output"] = "function_call_output"
    call_id: str
    output: str
    status: ItemStatus = "completed"


ListedItem = Annotated[
    InputMessageOut | OutputMessage | FunctionCallOut | FunctionCallOutputOut | ReasoningOut, Field(union_mode="left_to_right")
]


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ListedItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---------------------------------------------------------------------------------------------
# Streamed events, in the order they come (each carries its ``sequence_number``)


class _Event(BaseModel):
    sequence_number: int


class ResponseLifecycleEvent(_Event):
    """``response.created`` and ``response.in_progress`` first; ``response.completed``,
    ``response.incomplete`` (max_output_tokens reached) or ``response.failed`` last."""

    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    response: ResponseObject


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class OutputTextDoneEvent(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningTextDeltaEvent(_Event):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDoneEvent(_Event):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str


class FunctionCallArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event):
    """A failure after the 200; ``response.failed`` follows it."""

    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None = None


ResponseStreamEvent = Annotated[
    ResponseLifecycleEvent | OutputItemEvent | ContentPartEvent | OutputTextDeltaEvent | OutputTextDoneEvent
    | ReasoningTextDeltaEvent | ReasoningTextDoneEvent | FunctionCallArgumentsDeltaEvent
    | FunctionCallArgumentsDoneEvent | ErrorEvent,
    Field(discriminator="type"),
]


class ResponseStreamEventData(RootModel[ResponseStreamEvent]):
    """The ``data`` of one streamed event (the OpenAPI spec's event schema)."""
