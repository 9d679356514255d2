"""Next-token choice for a batch whose rows each keep their own sampling parameters."""

from __future__ import annotations

import torch

from glm_api.engines.base import SamplingParams


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
