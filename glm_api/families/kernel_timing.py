"""Timing candidate kernels at start-up (dense projections, fused projections, quantised
kernels): the fastest of repeated calls."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def fastest_ms(fn: Callable[[], object], seconds: float, device: torch.device | None = None) -> float:
    """Milliseconds of the fastest call of ``fn``, after one warm-up call, repeated for about
    ``seconds`` (at least one timed call). The fastest, not the mean: a neighbour taking a core
    mid-call (an OpenMP region waits for its slowest thread) inflates a mean by milliseconds,
    never the minimum. On CUDA each call is synchronised."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else None
    fn()
    best, started = float("inf"), time.perf_counter()
    while best == float("inf") or time.perf_counter() - started < seconds:
        if sync:
            sync()
        call = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - call)
    return best * 1000
