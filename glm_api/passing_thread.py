"""Torch work that runs once (start-up, an encoder batch) in a thread that ends with it, so that
the chat engine's thread holds the process's only OpenMP thread team (issue 24).

PyTorch's CPU kernels run on OpenMP (libgomp in the PyTorch wheels), and each thread that runs a
parallel region keeps its own team of worker threads for as long as it lives. libgomp lets idle
workers spin (300,000 rounds) before sleeping, so that the next region starts at once, but only
while the process has no more OpenMP threads than CPUs; past that it spins 100 rounds (libgomp's
``GOMP_SPINCOUNT`` documentation), and every parallel region of a decode step (each projection,
each attention) must wake a sleeping worker first. The server loaded its models in an event-loop
helper thread that stayed alive with its team, which was enough to pass that limit on a 2-CPU
machine: the same decode step's projections took 37-40 ms against 27-33 ms with the loading
thread gone (SmolLM2-135M shapes, 2-core dev VM; ``bench/bench_decode.py`` has the engine figures).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_passing_thread(fn: Callable[..., T], *args: object, name: str = "passing", **kwargs: object) -> T:
    """``fn(*args, **kwargs)`` in a new thread that ends when it returns (taking its OpenMP team
    with it); its result, or its exception raised here."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed to the caller, who decides
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
