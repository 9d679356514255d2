"""The output processor: sampled tokens into what each client receives.

For every sampled token it extends the request's output, decodes the new text incrementally
(holding back what could begin a stop string, :mod:`detokenizer`), decides whether the request
is finished and why (a stop token, a stop string, a complete grammar, ``max_tokens``, the
sequence limit) and builds the :class:`~glm_api.engines.base.GenerationChunk`. Chunks of
requests that go on are queued at once; the last chunk of a finished request is handed back to
the engine, whose one finish path retires the request and sends it. Everything queued leaves
in one thread hop per event loop per step (:class:`~glm_api.engines.outbox.Outbox`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from glm_api.engines.base import FinishReason, GenerationChunk, TokenLogprob
from glm_api.engines.outbox import Outbox
from glm_api.engines.request_state import EngineRequest
from glm_api.engines.stats import ChatEngineStats, prompt_class


class OutputProcessor:
    def __init__(self, row_limit: int, stats: ChatEngineStats) -> None:
        self.row_limit = row_limit  # prompt + output tokens one sequence may hold
        self.stats = stats
        self.outbox = Outbox()

    def process(
        self, rows: Sequence[EngineRequest], tokens: Sequence[int], logprobs: Sequence[TokenLogprob | None]
    ) -> list[tuple[EngineRequest, GenerationChunk]]:
        """Take each row's new token (and its log-probability, where asked) and stream its text;
        returns the finished rows with their last chunk, for the engine to retire and send."""
        finished = []
        for req, token, logprob in zip(rows, tokens, logprobs):
            req.output_ids.append(token)
            req.seq.token_ids.append(token)
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
                self.stats.ttft_seconds[prompt_class(len(req.prompt_ids))].observe(req.first_token_at - req.arrived)
            reason = self._finish_reason(req, token)
            chunk = self.chunk(req, req.detok.take(final=reason is not None), [token], reason)
            if logprob is not None:
                chunk.logprobs = [logprob]
            if reason is None:
                self.outbox.put(req, chunk)
            else:
                finished.append((req, chunk))
        self.stats.tokens_generated += len(rows)
        return finished

    def _finish_reason(self, req: EngineRequest, token: int) -> FinishReason | None:
        if token in req.stop_ids:  # counted as generated, never decoded into the text
            return "stop"
        if req.matcher is not None and req.matcher.is_stopped():  # the grammar is complete
            req.detok.push(token)
            return "stop"
        if req.detok.push(token):
            return "stop"
        if len(req.output_ids) >= req.params.max_tokens:
            return "length"
        if len(req.prompt_ids) + len(req.output_ids) >= self.row_limit:
            return "length"
        return None

    @staticmethod
    def chunk(req: EngineRequest, text: str, ids: list[int], reason: FinishReason | None) -> GenerationChunk:
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:  # the first chunk carries them
            prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, True
        return GenerationChunk(
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.seq.num_cached_tokens or 0,
            prompt_logprobs=prompt_logprobs,
        )

    def send(self, req: EngineRequest, item: GenerationChunk | BaseException) -> None:
        self.outbox.put(req, item)

    def flush(self) -> None:
        self.outbox.flush()
