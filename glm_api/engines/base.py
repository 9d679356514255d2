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
ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``spec``: a JSON Schema as JSON text, a regex, a JSON list of
    choices, or a Lark grammar; empty for ``json_object``. ``param`` names the request field a
    refusal points at. Plain data: the serving layer builds it without importing torch; a chat
    engine compiles it (:meth:`ChatEngine.compile_constraint`)."""

    kind: ConstraintKind
    spec: str = ""
    param: str = "response_format"
    #: For a prompt that opened the model's thinking: the Lark expression of the marker that
    #: closes it (``<[id]>`` for a token, else its text). Free reasoning up to it comes first;
    #: the grammar constrains what follows. Empty: the grammar holds from the first token.
    reasoning_end: str = ""


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
    grammar: Any = None  # what ChatEngine.compile_constraint returned: the output must match it
    priority: int = 0  # 0 interactive; batch lines 1: queued behind, preempted first
    # Log-probabilities (:class:`TokenLogprob`): None asks for none; a number asks for them with
    # that many most likely alternatives (0-20) at each position.
    logprobs: int | None = None  # of each generated token
    prompt_logprobs: int | None = None  # of each prompt token (computed: never from the prefix cache)
    # A P-Tuning v2 prefix the engine holds pinned, by name, attended before the prompt (None:
    # the engine's default, usually none). Set by the serving layer's routing, not by clients.
    prefix: str | None = None
    # Not a sampling knob, but it travels with the request's parameters as vLLM's lora_request
    # does: the LoRA adapter the request runs under (None: the base model).
    adapter: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's own distribution at its position: the
    log_softmax of the raw logits, before temperature, penalties and grammar masks (vLLM's
    default). ``top``: the most likely ids there with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationChunk:
    """New output of one request since the last chunk. ``finish_reason`` is set on the last."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled
    logprobs: list[TokenLogprob] | None = None  # one per token_ids, when params.logprobs asked
    # Once, on the first chunk, when params.prompt_logprobs asked: one per prompt token (the
    # first is None: nothing comes before it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves, for fingerprints and logs: the family, where the weights came from,
    their dtype."""

    family: str
    source: str
    dtype: str


class Tokenizing(Protocol):
    """The model's own tokenizer, as ``/tokenize`` and ``/detokenize`` use it (cheap, any thread)."""

    model_name: str

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids as the model sees them by default, special tokens included."""

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def vocab_size(self) -> int | None:
        """Rows of the model's input embedding: an id at or past it is not the model's."""


class ChatEngine(Tokenizing, Protocol):
    model_name: str
    context_length: int
    template: ChatTemplate

    def describe(self) -> EngineInfo: ...

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

    def compile_constraint(self, constraint: Constraint) -> Any:
        """A structured-output constraint compiled for this
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


class EmbeddingEngine(Tokenizing, Protocol):
    model_name: str
    dimensions: int
    max_seq_length: int

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def check_health(self) -> None: ...

    async def embed(self, texts: list[str]) -> EmbeddingResult: ...

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text before truncation (cheap, thread-safe: tokenizer only)."""

    def clip_texts(self, texts: list[str], max_tokens: int) -> list[str]:
        """Each text cut after its first ``max_tokens`` tokens (tokenizer only)."""
