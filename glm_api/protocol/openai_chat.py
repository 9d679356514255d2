"""The chat request: messages, tools and tool choice, and :class:`ChatCompletionRequest` with the
rules across its fields (the fields it shares with completions: :mod:`glm_api.protocol.openai_sampling`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from glm_api.protocol.common import JsonWireModel, stated
from glm_api.protocol.openai_sampling import MaxTokens, SamplingRequest, TopLogprobsCount
from glm_api.protocol.openai_structured import ResponseFormat, one_grammar


class FunctionCall(JsonWireModel):
    name: str
    arguments: str = "{}"


class ToolCallIn(JsonWireModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


#: The only content part this server reads (``_text_parts_only``).
TEXT_PART_SCHEMA = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
#: Roles whose content is required (not null), as serving.messages checks them (OpenAI's rule).
CONTENT_REQUIRED_ROLES = ("system", "developer", "user", "tool")


def _content_rule(schema: dict[str, Any]) -> None:
    """The spec states serving's content rule: content is required for these roles; an
    assistant message needs content or tool_calls; a (deprecated) function result may be null."""
    has_content = {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}}
    schema["anyOf"] = [
        {
            **has_content,
            "properties": {**has_content["properties"], "role": {"enum": [*CONTENT_REQUIRED_ROLES, "assistant"]}},
        },
        {
            "required": ["tool_calls"],
            "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}},
        },
        {"properties": {"role": {"const": "function"}}},
    ]


class ChatMessageIn(JsonWireModel):
    model_config = ConfigDict(json_schema_extra=_content_rule)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    #: A string, or a list of ``{"type": "text", "text": ...}`` parts (joined with newlines).
    #: None only where OpenAI allows it (an assistant's tool calls): serving refuses the rest,
    #: naming ``messages[i].content``.
    content: str | list[Annotated[dict[str, Any], stated(**TEXT_PART_SCHEMA)]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    #: An assistant turn's reasoning, as this server returns it (either name; vLLM and DeepSeek
    #: send ``reasoning_content``, newer clients ``reasoning``): handed to the chat template.
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _one_reasoning(self) -> "ChatMessageIn":
        both = self.reasoning_content is not None and self.reasoning is not None
        if both and self.reasoning_content != self.reasoning:
            raise ValueError("reasoning_content and reasoning are one field under two names: give one, or equal ones")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content parts of type {kind!r} are not supported; only text parts are")
        elif value is not None and not isinstance(value, str):
            raise ValueError("content must be a string or a list of text parts")
        return value

    def reasoning_text(self) -> str | None:
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)


class FunctionDef(JsonWireModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(JsonWireModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(JsonWireModel):
    name: str


class NamedToolChoice(JsonWireModel):
    type: Literal["function"] = "function"
    function: NamedFunction


def _chat_rules(schema: dict[str, Any]) -> None:
    """The spec states serving's rules across fields: one grammar, and a forced tool call
    (tools with ``tool_choice`` required or named) is that grammar, so nothing else asks for one;
    ``top_logprobs`` only with ``logprobs: true``."""
    one_grammar(schema)
    schema["allOf"].append({"anyOf": [
        {"properties": {"tools": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}},
        {"properties": {"tool_choice": {"enum": ["none", "auto", None]}}},
        {"properties": {
            "response_format": {"anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]},
            "structured_outputs": {"type": "null"},
        }},
    ]})
    # Alternatives per token only with logprobs on (OpenAI's rule).
    schema["allOf"].append({"anyOf": [
        {"properties": {"top_logprobs": {"type": "null"}}},
        {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
    ]})


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra=_chat_rules)

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; calls come back as the model writes them
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobsCount | None = None
    #: OpenAI's reasoning effort, mapped onto the template's own option (``reasoning_effort``, or
    #: ``enable_thinking``/``thinking``: false for "none"); ignored by models that do not think.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    #: Extra variables for the chat template (vLLM's extra): ``enable_thinking``, ``thinking``,
    #: ``clear_thinking``... Names apply_chat_template sets itself are refused.
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value
