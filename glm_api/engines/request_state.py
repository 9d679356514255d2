"""A chat request inside the engine, and the stream its client reads.

The worker thread owns an :class:`EngineRequest` (its output, sampling state, grammar matcher and
:class:`~glm_api.engines.sequence.Sequence`, its place in the KV pool); the client's side is
:func:`stream_output`, which reads what the worker puts in the request's queue on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from glm_api.engines.base import GenerationChunk, SamplingParams, TokenLogprob
from glm_api.engines.detokenizer import IncrementalDetokenizer
from glm_api.engines.sequence import Sequence


@dataclass(eq=False)  # identity: requests are found in lists by object, never by value
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: IncrementalDetokenizer
    seq: Sequence
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # [V] bool: ids in prompt or output (repetition penalty)
    counts: torch.Tensor | None = None  # [V] output id counts (presence/frequency penalty)
    stop_ids: frozenset[int] = frozenset()
    per_row: bool = False  # penalties or sampling: not covered by the batch-wide argmax
    matcher: Any = None  # llguidance matcher of the request's grammar (structured outputs)
    started: bool = False  # admitted once (a preempted request is not counted again)
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    # Its prompt's log-probabilities as the steps compute them (params.prompt_logprobs), sent
    # once, with the first chunk.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def priority(self) -> int:
        return self.params.priority


async def stream_output(queue: asyncio.Queue, abandon: Callable[[], None]) -> AsyncIterator[GenerationChunk]:
    """The request's chunks as the worker sends them; ``abandon`` (the engine's abort) runs when
    the consumer stops before the last chunk (the client went away)."""
    finished = False
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            # A consumer that fell behind gets what piled up as one chunk: under load this
            # cuts the per-event work (SSE framing, JSON) on the event loop.
            while item.finish_reason is None and not queue.empty():
                nxt = queue.get_nowait()
                if isinstance(nxt, BaseException):
                    finished = True
                    yield item
                    raise nxt
                item = _merge(item, nxt)
            if item.finish_reason is not None:
                finished = True
            yield item
            if finished:
                return
    finally:
        if not finished:
            abandon()


def _merge(a: GenerationChunk, b: GenerationChunk) -> GenerationChunk:
    return GenerationChunk(
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        finish_reason=b.finish_reason,
        prompt_tokens=b.prompt_tokens,
        completion_tokens=b.completion_tokens,
        cached_tokens=b.cached_tokens,
        logprobs=None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or []),
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
    )
