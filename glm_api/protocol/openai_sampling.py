"""What chat and legacy completions requests share: :class:`SamplingRequest`, its field types, and
the limit on logprob alternatives both state."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from glm_api.protocol.common import (
    MAX_TOKENS_LIMIT,
    SEED_RANGE,
    JsonWireModel,
    RepetitionPenalty,
    Stop,
    Temperature,
    TopP,
    json_int,
    stated,
)
from glm_api.protocol.openai_structured import StructuredOutputs

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MaxTokens = json_int(ge=1, le=MAX_TOKENS_LIMIT)

#: Logit bias is refused unless empty: the spec says so.
NO_LOGIT_BIAS = stated(anyOf=[{"type": "object", "maxProperties": 0}, {"type": "null"}])


#: Alternatives per position, at most (OpenAI's limit for top_logprobs and for completions' logprobs).
MAX_TOP_LOGPROBS = 20
TopLogprobsCount = json_int(ge=0, le=MAX_TOP_LOGPROBS)


def _refuse_logit_bias(value: dict | None) -> dict | None:
    if value:
        raise ValueError("logit_bias is not supported by this server")
    return value


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
