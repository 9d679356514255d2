"""The OpenAI API's wire shapes: /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/models (vLLM-style /v1/tokenize and /v1/detokenize: :mod:`glm_api.protocol.tokenizer`).

Requests accept unknown fields (OpenAI clients send newer ones) and ``null`` for every
optional parameter, as OpenAI does; ``None`` means "the default", resolved in serving.
Responses mirror the ``openai`` package's types field for field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from glm_api.protocol.common import MAX_TOKENS_LIMIT, MaxTokens, RepetitionPenalty, Stop, Temperature, TopP, Usage, WireModel

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
#: Token ids are never negative; the upper bound is the model's vocabulary, checked in serving.
TokenIds = list[int]


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


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
TopLogprobsCount = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
#: Completions may generate nothing (``max_tokens: 0``): with ``echo`` and ``logprobs`` that
#: scores a prompt, as evaluation harnesses do.
CompletionMaxTokens = Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)]


def _refuse_logit_bias(value: dict | None) -> dict | None:
    if value:
        raise ValueError("logit_bias is not supported by this server")
    return value


# ---------------------------------------------------------------------------------------------
# Chat completions: request


class FunctionCall(WireModel):
    name: str
    arguments: str = "{}"


class ToolCallIn(WireModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    #: A string, or a list of ``{"type": "text", "text": ...}`` parts (joined with newlines).
    #: None only where OpenAI allows it (an assistant's tool calls): serving refuses the rest,
    #: naming ``messages[i].content``.
    content: str | list[dict[str, Any]] | None = None
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


class FunctionDef(WireModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(WireModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(WireModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a "json_schema": {"name", "schema"} object')
        return self


class StructuredOutputs(WireModel):
    """vLLM's structured-output extras: one of them, as the output's grammar."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructuredOutputs":
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar")
        return self


class StreamOptions(WireModel):
    include_usage: bool | None = False


class SamplingRequest(WireModel):
    """The fields chat and legacy completions share; both translate them the same way."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: int | None = Field(None, ge=1)  # the upper bound is settings.max_n, checked in serving
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # Not OpenAI, accepted as extras (vLLM does the same).
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: RepetitionPenalty | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> dict | None:
        return _refuse_logit_bias(value)


class ChatCompletionRequest(SamplingRequest):
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
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: CompletionMaxTokens | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
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


class EmbeddingRequest(WireModel):
    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
