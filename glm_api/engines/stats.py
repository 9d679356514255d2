"""Counters the engines keep for /metrics, with no dependency on a metrics library.

The engine threads write them; the metrics collector reads them on each scrape. Histograms
keep fixed bucket counts (not the raw values), so memory stays bounded however long nobody
scrapes. Each object has its own small lock: a scrape sees a consistent histogram.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A step is a pause every running stream waits through: the paced prefill aims at 0.5 s.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
# Time to first token by prompt length: a long prompt's first token is slow by nature and must
# not hide a short prompt's wait behind it (nor the reverse).
PROMPT_CLASSES = ((512, "1-512"), (2048, "513-2048"), (8192, "2049-8192"), (None, "8193+"))


def prompt_class(tokens: int) -> str:
    return next(name for bound, name in PROMPT_CLASSES if bound is None or tokens <= bound)


class Histogram:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative ``(upper bound, count)`` pairs ending with ``+inf``, the sum, the count."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts):
            running += count
            cumulative.append((bound, running))
        return cumulative, total, running


@dataclass
class ChatEngineStats:
    steps: int = 0  # forwards over the scheduled rows (decode tokens and prompt chunks)
    prefills: int = 0  # steps that carried prompt tokens (a chunk of one or more prompts)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in the KV pool (prefix cache), not prefilled
    preemptions: int = 0  # rows whose blocks were taken back, to be recomputed later
    tokens_generated: int = 0
    rejected: int = 0  # requests refused with 429 because the queue was full
    finished: Counter = field(default_factory=Counter)  # by finish reason
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))  # rows per decode step
    # arrival to first token, by prompt_class
    ttft_seconds: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram(TTFT_BUCKETS) for _, name in PROMPT_CLASSES}
    )
    step_seconds: Histogram = field(default_factory=lambda: Histogram(STEP_BUCKETS))  # one forward + sampling


@dataclass
class EmbeddingEngineStats:
    batches: int = 0  # forward passes
    texts: int = 0
    requests: int = 0
    rejected: int = 0
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))  # texts per forward
