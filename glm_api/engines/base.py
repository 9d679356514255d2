"""Engine interfaces and the types that cross them.

Modelled on vLLM's ``EngineClient``: the serving layer formats a prompt, then iterates
``generate()``; another engine (vLLM on a big GPU host) can implement the same protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from glm_api.families.base import ChatTemplate

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # HF style, over prompt and output
    presence_penalty: float = 0.0  # OpenAI style, over output
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    grammar: Any = None  # engines.grammar.CompiledGrammar: the output must match it

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class GenerationChunk:
    """New output of one request since the last chunk. ``finish_reason`` is set on the last."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled


class ChatEngine(Protocol):
    model_name: str
    context_length: int
    template: ChatTemplate

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def check_health(self) -> None:
        """Raise :class:`glm_api.errors.EngineUnavailableError` when the engine cannot serve."""

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        """Queue one request and return the stream of its output.

        Admission is decided here, before any byte is sent: a full queue raises
        :class:`glm_api.errors.RateLimitError`, a dead engine
        :class:`glm_api.errors.EngineUnavailableError`. Closing the stream aborts the request.
        """

    def abort(self, request_id: str) -> None: ...

    def compile_constraint(self, constraint: Any) -> Any:
        """A structured-output constraint (``engines.grammar.Constraint``) compiled for this
        model's vocabulary, to pass as ``SamplingParams.grammar``. Blocking; a constraint that
        cannot be enforced raises :class:`glm_api.errors.BadRequestError`."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...


@dataclass
class EmbeddingResult:
    vectors: np.ndarray  # float32 [n, d]
    token_counts: list[int]


class EmbeddingEngine(Protocol):
    model_name: str
    dimensions: int
    max_seq_length: int

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def check_health(self) -> None: ...

    async def embed(self, texts: list[str]) -> EmbeddingResult: ...

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text before truncation (cheap, thread-safe: tokenizer only)."""

    def tokenize(self, texts: list[str]) -> list[list[int]]: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...
