"""Host time of a decode step's block tables: ``DecodeRows.table_tensor`` against the nested-list
``torch.tensor`` it replaced (the baseline, measured in the same run), per rows and context.

    python bench/bench_block_tables.py

Every eager or captured decode step builds its ``[rows, width]`` table of block ids on the host
(issue 24, item 2: per-step work that computes nothing); with many long rows it is a share of a
batched GPU step.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import machine_line, print_table
from glm_api.engines.decode_step import DecodeRows
from glm_api.engines.kv_blocks import NULL_BLOCK

BLOCK = 16


def _nested(host: DecodeRows, width: int) -> torch.Tensor:
    return torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in host.tables], dtype=torch.long)


def _us(fn, seconds: float = 0.5) -> float:
    fn()
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        start = time.perf_counter()
        for _ in range(10):
            fn()
        best = min(best, (time.perf_counter() - start) / 10)
    return best * 1e6


def main() -> None:
    rng = random.Random(0)
    table = []
    for rows, context in ((1, 500), (8, 2000), (32, 500), (32, 2000), (32, 8000)):
        steps = []
        for i in range(rows):
            past = context + rng.randrange(100)
            steps.append((list(range(i * 10_000, i * 10_000 + past // BLOCK + 1)), past, 1))
        host = DecodeRows.build(steps, rows, BLOCK)
        width = max(2, host.blocks)
        assert torch.equal(host.table_tensor(width), _nested(host, width))
        before, after = _us(lambda: _nested(host, width)), _us(lambda: host.table_tensor(width))
        table.append((rows, context, before, after, before / after))
    print(machine_line())
    print_table(("rows", "context tokens", "nested list us", "table_tensor us", "speed-up"), table)


if __name__ == "__main__":
    main()
