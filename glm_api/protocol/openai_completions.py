"""Legacy completions (/v1/completions): :class:`CompletionRequest` and the :class:`Completion`
answer, streamed or not (the fields shared with chat: :mod:`glm_api.protocol.openai_sampling`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from glm_api.protocol.common import MAX_TOKENS_LIMIT, json_int, stated
from glm_api.protocol.openai_inputs import check_texts_or_token_arrays, texts_or_token_arrays
from glm_api.protocol.openai_sampling import SamplingRequest, TopLogprobsCount
from glm_api.protocol.openai_structured import ResponseFormat, one_grammar
from glm_api.protocol.openai_usage import OpenAIUsage

#: Completions may generate nothing (``max_tokens: 0``): with ``echo`` and ``logprobs`` that
#: scores a prompt, as evaluation harnesses do.
CompletionMaxTokens = json_int(ge=0, le=MAX_TOKENS_LIMIT)


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
