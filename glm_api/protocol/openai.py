"""The OpenAI API's wire shapes: /v1/chat/completions, /v1/completions, /v1/embeddings and
/v1/models (vLLM-style /v1/tokenize and /v1/detokenize: :mod:`glm_api.protocol.tokenizer`).

Requests accept unknown fields (OpenAI clients send newer ones) and ``null`` for every
optional parameter, as OpenAI does; ``None`` means "the default", resolved in serving.
Responses mirror the ``openai`` package's types field for field.

This module is their public face: it defines nothing and re-exports every name from where it lives,
so ``from glm_api.protocol.openai import ...`` keeps working.

- :mod:`~glm_api.protocol.openai_chat`: the chat request (messages, tools, tool choice).
- :mod:`~glm_api.protocol.openai_chat_response`: the chat answer and its streamed chunks.
- :mod:`~glm_api.protocol.openai_completions`: legacy completions, request and answer.
- :mod:`~glm_api.protocol.openai_embeddings`: embeddings, request and answer.
- :mod:`~glm_api.protocol.openai_models`: the model list.
- :mod:`~glm_api.protocol.openai_sampling`: what chat and completions requests share.
- :mod:`~glm_api.protocol.openai_structured`: ``response_format`` and ``structured_outputs``.
- :mod:`~glm_api.protocol.openai_inputs`: a prompt's or an input's shape (texts or token arrays).
- :mod:`~glm_api.protocol.openai_usage`: token counts with OpenAI's details.
"""

from __future__ import annotations

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
from glm_api.protocol.openai_completions import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionMaxTokens,
    CompletionRequest,
)
from glm_api.protocol.openai_embeddings import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from glm_api.protocol.openai_inputs import TokenIds, texts_or_token_arrays
from glm_api.protocol.openai_models import ModelCard, ModelList
from glm_api.protocol.openai_sampling import (
    MAX_TOP_LOGPROBS,
    NO_LOGIT_BIAS,
    MaxTokens,
    Penalty,
    SamplingRequest,
    StreamOptions,
    TopLogprobsCount,
)
from glm_api.protocol.openai_structured import JsonSchemaFormat, ResponseFormat, StructuredOutputs
from glm_api.protocol.openai_usage import CompletionTokensDetails, OpenAIUsage, PromptTokensDetails

# Every public name this module defined before the split (private helpers stay in their modules).
__all__ = [
    # openai_chat
    "CONTENT_REQUIRED_ROLES",
    "TEXT_PART_SCHEMA",
    "ChatCompletionRequest",
    "ChatMessageIn",
    "FunctionCall",
    "FunctionDef",
    "NamedFunction",
    "NamedToolChoice",
    "ToolCallIn",
    "ToolDef",
    # openai_chat_response
    "ChatChoiceOut",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatDelta",
    "ChatMessageOut",
    "ChatTokenLogprob",
    "ChoiceLogprobs",
    "FunctionCallDelta",
    "FunctionCallOut",
    "ToolCallDelta",
    "ToolCallOut",
    "TopLogprob",
    # openai_completions
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionMaxTokens",
    "CompletionRequest",
    # openai_embeddings
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    # openai_inputs
    "TokenIds",
    "texts_or_token_arrays",
    # openai_models
    "ModelCard",
    "ModelList",
    # openai_sampling
    "MAX_TOP_LOGPROBS",
    "NO_LOGIT_BIAS",
    "MaxTokens",
    "Penalty",
    "SamplingRequest",
    "StreamOptions",
    "TopLogprobsCount",
    # openai_structured
    "JsonSchemaFormat",
    "ResponseFormat",
    "StructuredOutputs",
    # openai_usage
    "CompletionTokensDetails",
    "OpenAIUsage",
    "PromptTokensDetails",
]
