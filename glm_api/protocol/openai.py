"""The OpenAI API's wire shapes: /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/models (vLLM-style /v1/tokenize and /v1/detokenize: :mod:`glm_api.protocol.tokenizer`).

Requests accept unknown fields (OpenAI clients send newer ones) and ``null`` for every
optional parameter, as OpenAI does; ``None`` means "the default", resolved in serving.
Responses mirror the ``openai`` package's types field for field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from glm_api.protocol.common import (
    MAX_TOKENS_LIMIT,
    SEED_RANGE,
    TOKEN_ID_SCHEMA,
    JsonInt,
    JsonWireModel,
    json_int,
    RepetitionPenalty,
    Stop,
    Temperature,
    TopP,
    Usage,
    stated,
)

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
#: Token ids are never negative; the upper bound is the model's vocabulary, checked in serving.
TokenIds = list[Annotated[JsonInt, stated(**TOKEN_ID_SCHEMA)]]
MaxTokens = json_int(ge=1, le=MAX_TOKENS_LIMIT)


def texts_or_token_arrays(min_text_length: int = 0) -> Any:
    """The type of a prompt or input, with the shape rules of ``_texts_or_token_arrays`` stated
    for the spec: no empty list, no empty token array, no negative id (and, for completions,
    no empty text: it leaves nothing to continue)."""
    text = Annotated[str, stated(minLength=min_text_length)] if min_text_length else str
    ids = Annotated[TokenIds, stated(minItems=1)]
    return text | Annotated[list[text], stated(minItems=1)] | ids | Annotated[list[ids], stated(minItems=1)]


#: Logit bias is refused unless empty: the spec says so.
NO_LOGIT_BIAS = stated(anyOf=[{"type": "object", "maxProperties": 0}, {"type": "null"}])


def _is_id(value: Any) -> bool:
    # A JSON integer: 7 or 7.0 (JSON Schema counts both, as the spec's clients do), never true.
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(_is_id(i) for i in value)


def _texts_or_token_arrays(value: Any, name: str) -> Any:
    """A string, a list of strings, a token array or a list of token arrays (not a mix)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a string, a list of strings, a token array or a list of token arrays")
    arrays = [value] if _is_ids(value) else value
    if all(isinstance(v, str) for v in value):
        return value
    if not all(_is_ids(a) and a for a in arrays):
        raise ValueError(f"{name} must be a string, a list of strings, a token array or a list of token arrays")
    if any(i < 0 for a in arrays for i in a):
        raise ValueError("token ids must not be negative")
    return value


#: Alternatives per position, at most (OpenAI's limit for top_logprobs and for completions' logprobs).
MAX_TOP_LOGPROBS = 20
TopLogprobsCount = json_int(ge=0, le=MAX_TOP_LOGPROBS)
#: Completions may generate nothing (``max_tokens: 0``): with ``echo`` and ``logprobs`` that
#: scores a prompt, as evaluation harnesses do.
CompletionMaxTokens = json_int(ge=0, le=MAX_TOKENS_LIMIT)


def _refuse_logit_bias(value: dict | None) -> dict | None:
    if value:
        raise ValueError("logit_bias is not supported by this server")
    return value


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


class JsonSchemaFormat(JsonWireModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


def _json_schema_given(schema: dict[str, Any]) -> None:
    """The spec states ``_schema_given``, and ``structured._schema_text``: a schema that is an
    object (or true)."""
    schema["anyOf"] = [
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {
            "required": ["json_schema"],
            "properties": {"json_schema": {"type": "object", "properties": {"schema": {"anyOf": [{"type": "object"}, {"const": True}]}}}},
        },
    ]


class ResponseFormat(JsonWireModel):
    model_config = ConfigDict(json_schema_extra=_json_schema_given)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a "json_schema": {"name", "schema"} object')
        return self


def _exactly_one_kind(schema: dict[str, Any]) -> None:
    """The spec states ``_exactly_one``."""
    kinds = ("json", "regex", "choice", "grammar")
    schema["oneOf"] = [
        {"required": [kind], "properties": {kind: {"not": {"type": "null"}}, **{k: {"type": "null"} for k in kinds if k != kind}}}
        for kind in kinds
    ]


class StructuredOutputs(JsonWireModel):
    """vLLM's structured-output extras: one of them, as the output's grammar."""

    #: A JSON schema, or its JSON text.
    json_: dict[str, Any] | Annotated[str, stated(contentMediaType="application/json")] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True, json_schema_extra=_exactly_one_kind)

    @field_validator("json_")
    @classmethod
    def _json_text_parses(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        if isinstance(value, str):
            try:
                json.loads(value)
            except ValueError:
                raise ValueError("the JSON schema text is not valid JSON") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar")
        return self


class StreamOptions(JsonWireModel):
    include_usage: bool | None = False


class SamplingRequest(JsonWireModel):
    """The fields chat and legacy completions share; both translate them the same way."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: json_int(ge=1) | None = None  # type: ignore[valid-type]  # the upper bound is settings.max_n, checked in serving
    stop: Stop = None
    seed: json_int(**SEED_RANGE) | None = None  # type: ignore[valid-type]
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    logit_bias: Annotated[dict[str, float] | None, NO_LOGIT_BIAS] = None
    # Not OpenAI, accepted as extras (vLLM does the same).
    top_k: json_int(ge=0) | None = None  # type: ignore[valid-type]
    repetition_penalty: RepetitionPenalty | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        return _refuse_logit_bias(value)


#: Serving's rule (``structured.output_constraint``): one grammar per request.
_ONE_GRAMMAR = {"anyOf": [
    {"properties": {"response_format": {"anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]}}},
    {"properties": {"structured_outputs": {"type": "null"}}},
]}


def _one_grammar(schema: dict[str, Any]) -> None:
    schema.setdefault("allOf", []).append(_ONE_GRAMMAR)


def _chat_rules(schema: dict[str, Any]) -> None:
    """The spec states serving's rules across fields: one grammar, and a forced tool call
    (tools with ``tool_choice`` required or named) is that grammar, so nothing else asks for one;
    ``top_logprobs`` only with ``logprobs: true``."""
    _one_grammar(schema)
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
    model_config = ConfigDict(json_schema_extra=_one_grammar)

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
        return _texts_or_token_arrays(value, "prompt")

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
        return _texts_or_token_arrays(value, "input")


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
