"""The sampler: the next token of every sampling sequence of a step, from the step's logits.

Batched where the rows allow it: constrained rows first lose every token their grammar does not
allow next (one bitmask for all of them, :func:`~glm_api.engines.grammar.mask_logits`), then one
argmax and one device sync for the whole batch; rows with penalties or real sampling (temperature,
top-p/top-k, a seed) replace their entry from their own row (argmax of the same row's logits, so
batched greedy equals greedy alone). Then each row takes its token: its grammar matcher advances
and its penalty state counts it.

Log-probabilities come from the same logits, for the rows that ask only: the log_softmax of
their raw rows, taken before any mask, penalty or temperature touches them (the model's own
distribution, as vLLM reports by default), then the chosen token's entry and the top ones in
one batched gather and top-k. A step without such rows computes nothing for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from glm_api.engines.base import SamplingParams, TokenLogprob
from glm_api.engines.grammar import mask_logits


class Sampling(Protocol):
    """What the sampler reads and keeps of a request (an ``EngineRequest``)."""

    params: SamplingParams
    prompt_ids: list[int]
    per_row: bool  # needs_per_row_sampling(params)
    matcher: Any  # llguidance matcher of its grammar, or None
    generator: torch.Generator | None
    seen: torch.Tensor | None
    counts: torch.Tensor | None


@dataclass
class Sampled:
    tokens: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # per row: its token's, when its params ask (else None)


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device  # where penalty state and seeded generators live

    def sample(self, rows: Sequence[Sampling], logits: torch.Tensor) -> Sampled:
        """One token for each row of ``logits`` ``[len(rows), V]`` (masked in place), taken."""
        asking = [i for i, req in enumerate(rows) if req.params.logprobs is not None]
        # Before the masks below change ``logits`` in place: the raw distribution.
        raw = log_softmax_rows(logits, asking) if asking else None
        constrained = [i for i, req in enumerate(rows) if req.matcher is not None]
        if constrained:
            mask_logits(logits, constrained, [rows[i].matcher for i in constrained])
        tokens = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(rows):
            if req.per_row:
                self._start(req, logits.shape[-1])
                row_logits = apply_penalties(logits[i].float(), req.params, req.seen, req.counts)
                tokens[i] = sample_token(row_logits, req.params, req.generator)
            self._take(req, tokens[i])
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if raw is not None:
            found = token_logprobs(raw, [tokens[i] for i in asking], [rows[i].params.logprobs or 0 for i in asking])
            for i, lp in zip(asking, found):
                logprobs[i] = lp
        return Sampled(tokens, logprobs)

    @staticmethod
    def score(logits: torch.Tensor, targets: Sequence[int], top: int) -> list[TokenLogprob]:
        """The log-probability of ``targets[i]`` under row ``i`` of raw ``logits`` ``[N, V]``
        (prompt tokens, each under the logits of the position before it), with ``top`` alternatives."""
        return token_logprobs(log_softmax_rows(logits), targets, [top] * len(targets))

    def _start(self, req: Sampling, vocab: int) -> None:
        """Penalty state and a seeded generator, made on a request's first sampled token."""
        if req.params.seed is not None and req.generator is None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
        if req.params.repetition_penalty != 1.0 and req.seen is None:
            req.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            ids = [i for i in req.prompt_ids if i < vocab]
            req.seen[torch.tensor(ids, dtype=torch.long, device=self.device)] = True
        if (req.params.presence_penalty or req.params.frequency_penalty) and req.counts is None:
            req.counts = torch.zeros(vocab, dtype=torch.int32, device=self.device)

    @staticmethod
    def _take(req: Sampling, token: int) -> None:
        if req.matcher is not None:
            req.matcher.consume_token(token)
        if req.seen is not None:
            req.seen[token] = True
        if req.counts is not None:
            req.counts[token] += 1


def needs_per_row_sampling(params: SamplingParams) -> bool:
    """Whether a row needs more than the batch-wide argmax: penalties, or real sampling."""
    return (
        not params.greedy
        or params.repetition_penalty != 1.0
        or bool(params.presence_penalty)
        or bool(params.frequency_penalty)
    )


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, output_counts: torch.Tensor | None
) -> torch.Tensor:
    """Repetition penalty (HF: over prompt and output) and OpenAI presence/frequency penalties
    (over output only) on one row of logits ``[V]``."""
    if params.repetition_penalty != 1.0 and seen is not None:
        p = params.repetition_penalty
        penalised = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(seen, penalised, logits)
    if (params.presence_penalty or params.frequency_penalty) and output_counts is not None:
        counts = output_counts.to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next id from one row of (already penalised) float32 logits ``[V]``."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the top one always stays.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop[0] = False  # a top_p that underflows float32 (5e-324 -> 0.0) must still leave one
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def log_softmax_rows(logits: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
    """float32 log-probabilities of some rows of ``logits`` ``[N, V]`` (all rows: None), in a new tensor."""
    if rows is not None:
        logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
    return torch.log_softmax(logits.float(), dim=-1)


def token_logprobs(logprobs: torch.Tensor, targets: Sequence[int], top: Sequence[int]) -> list[TokenLogprob]:
    """For each row ``i`` of ``logprobs`` ``[N, V]``: ``targets[i]``'s entry and the ``top[i]``
    largest, read in one gather and one top-k. A target's value and the same id's value among the
    top ones are the same float (clients compare them to tell a greedy token)."""
    index = torch.tensor(targets, dtype=torch.long, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].tolist()
    k = min(max(top, default=0), logprobs.shape[-1])
    values: list[list[float]] = [[] for _ in targets]
    ids: list[list[int]] = [[] for _ in targets]
    if k:
        best = torch.topk(logprobs, k, dim=-1)
        values, ids = best.values.tolist(), best.indices.tolist()
    return [
        TokenLogprob(t, lp, tuple(zip(ids[i][: top[i]], values[i][: top[i]])))
        for i, (t, lp) in enumerate(zip(targets, chosen))
    ]
