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
from glm_api.protocol.openai_chat import (
    CONTENT_REQUIRED_ROLES,
    TEXT_PART_SCHEMA,
    ChatCompletionRequest,
    ChatMessageIn,
    FunctionCall,
    FunctionDef,
    NamedFunction,
    NamedToolChoice,
    ToolCallIn,
    ToolDef,
)
from glm_api.protocol.openai_chat_response import (
    ChatChoiceOut,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    ChatTokenLogprob,
    ChoiceLogprobs,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
)
from glm_api.protocol.openai_structured import JsonSchemaFormat, ResponseFormat, StructuredOutputs, one_grammar
from glm_api.protocol.openai_usage import CompletionTokensDetails, OpenAIUsage, PromptTokensDetails

#: Completions may generate nothing (``max_tokens: 0``): with ``echo`` and ``logprobs`` that
#: scores a prompt, as evaluation harnesses do.
CompletionMaxTokens = json_int(ge=0, le=MAX_TOKENS_LIMIT)


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
