"""Token counts as OpenAI reports them, with its details (cached prompt tokens, reasoning tokens):
chat completions and legacy completions both answer with :class:`OpenAIUsage`."""

from __future__ import annotations

from pydantic import BaseModel

from glm_api.protocol.common import Usage


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
