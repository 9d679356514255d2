"""Sampling survives every parameter the protocols accept, at their extremes."""

from __future__ import annotations

import itertools

import torch

from glm_api.engines.base import SamplingParams
from glm_api.engines.sampler import apply_penalties, sample_token


def test_extreme_but_valid_parameters_always_give_a_token():
    torch.manual_seed(0)
    logits = torch.randn(500) * 8
    seen = torch.zeros(500, dtype=torch.bool)
    seen[:250] = True
    counts = torch.zeros(500, dtype=torch.int32)
    counts[:20] = 4
    grid = itertools.product(
        [0.0, 1e-5, 1.1e-5, 1e-3, 2.0],  # temperature
        [5e-324, 1e-300, 1e-8, 0.9, 1.0],  # top_p (5e-324 is 0.0 in float32)
        [0, 1, 7],  # top_k
        [0.01, 1.0, 10.0],  # repetition_penalty
        [-2.0, 0.0, 2.0],  # presence and frequency penalty
    )
    for temperature, top_p, top_k, repetition, penalty in grid:
        params = SamplingParams(
            max_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition,
            presence_penalty=penalty, frequency_penalty=penalty,
        )
        token = sample_token(apply_penalties(logits.clone(), params, seen, counts), params, None)
        assert 0 <= token < 500


def test_tiny_top_p_is_greedy_and_seeds_repeat():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-9)
    assert {sample_token(logits, params, None) for _ in range(20)} == {1}
    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    draws = [[sample_token(logits, seeded, torch.Generator().manual_seed(7)) for _ in range(1)] for _ in range(5)]
    assert len({tuple(d) for d in draws}) == 1
