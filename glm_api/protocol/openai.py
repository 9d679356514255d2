"""The OpenAI API's wire shapes: /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/models (vLLM-style /v1/tokenize and /v1/detokenize: :mod:`glm_api.protocol.tokenizer`).

Requests accept unknown fields (OpenAI clients send newer ones) and ``null`` for every
optional parameter, as OpenAI does; ``None`` means "the default", resolved in serving.
Responses mirror the ``openai`` package's types field for field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from glm_api.protocol.common import MAX_TOKENS_LIMIT, JsonWireModel, Usage, json_int, stated
from glm_api.protocol.openai_inputs import TokenIds, check_texts_or_token_arrays, texts_or_token_arrays
from glm_api.protocol.openai_sampling import (
    MAX_TOP_LOGPROBS,
    NO_LOGIT_BIAS,
    MaxTokens,
    Penalty,
    SamplingRequest,
    StreamOptions,
    TopLogprobsCount,
)
from glm_api.protocol.openai_structured import JsonSchemaFormat, ResponseFormat, StructuredOutputs, one_grammar

#: Completions may generate nothing (``max_tokens: 0``): with ``echo`` and ``logprobs`` that
#: scores a prompt, as evaluation harnesses do.
CompletionMaxTokens = json_int(ge=0, le=MAX_TOKENS_LIMIT)


# ---------------------------------------------------------------------------------------------
# Chat completions: request


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
        {**has_content, "properties": {**has_content["properties"], "role": {"enum": [*CONTENT_REQUIRED_ROLES, "assistant"]}}},
        {"required": ["tool_calls"], "properties": {"role": {"const": "assistant"}, "tool_calls": {"type": "array", "minItems": 1}}},
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


# ---------------------------------------------------------------------------------------------
# Chat completions: response and chunks


class FunctionCallOut(BaseModel):
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


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # completion tokens the model spent thinking (inside <think>...</think>)


class OpenAIUsage(Usage):
    """The seed's usage plus OpenAI's token details (the seed's shape stays as it was)."""

    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()
    completion_tokens_details: CompletionTokensDetails = CompletionTokensDetails()

    @classmethod
    def counted(cls, prompt: int, completion: int, cached: int, reasoning: int = 0) -> OpenAIUsage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning),
        )


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


# ---------------------------------------------------------------------------------------------
# Legacy completions


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra=one_grammar)

    prompt: texts_or_token_arrays(min_text_length=1)  # type: ignore[valid-type]
    max_tokens: CompletionMaxTokens | None = None
    echo: bool | None = False
    suffix: Annotated[str | None, stated(anyOf=[{"type": "string", "maxLength": 0}, {"type": "null"}])] = None
    best_of: json_int(ge=1) | None = None  # type: ignore[valid-type]
    logprobs: TopLogprobsCount | None = None  # alternatives per token; 0: the tokens' own only
    response_format: ResponseFormat | None = None  # an extension: OpenAI's completions have none

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        return check_texts_or_token_arrays(value, "prompt")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this server")
        return value

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of is not supported, except equal to n")
        return self


class CompletionLogprobs(BaseModel):
    """Per token (the echoed prompt's first, then the generated ones): its text, its
    log-probability (None for the first prompt token: nothing predicts it), the most likely
    tokens there with theirs (the token itself included), and where its text starts in the
    choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


# ---------------------------------------------------------------------------------------------
# Embeddings


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


# ---------------------------------------------------------------------------------------------
# Models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm-api"
    # Ours, beside OpenAI's fields (the SDK keeps extras): what a client needs to size requests.
    kind: Literal["chat", "embedding", "rerank"]
    context_length: int | None = None
    dimensions: int | None = None
    parent: str | None = None  # the model this one runs over (vLLM's field): a LoRA adapter's or P-Tuning v2 prefix's base


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
