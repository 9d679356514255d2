"""Torch work in a thread that ends with it (glm_api/passing_thread.py): the result or the
exception comes back, and the OpenMP worker threads the work started end with it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from glm_api.passing_thread import run_in_passing_thread

TASKS = Path("/proc/self/task")


def _threads() -> int:
    return len(os.listdir(TASKS))


def test_the_result_and_the_exception_come_back():
    assert run_in_passing_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad"):
        run_in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))


def _parallel_work() -> None:
    a = torch.randn(512, 512)
    for _ in range(3):
        a @ a  # an OpenMP parallel region with the intra-op threads


@pytest.mark.skipif(not TASKS.exists() or torch.get_num_threads() < 2, reason="needs /proc and 2 torch threads")
def test_the_openmp_team_ends_with_the_passing_thread():
    before = _threads()
    run_in_passing_thread(_parallel_work)
    deadline = time.monotonic() + 5
    while _threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads() == before
    # A thread that stays keeps its team: what the passing thread avoids.
    done, stop = threading.Event(), threading.Event()
    keeper = threading.Thread(target=lambda: (_parallel_work(), done.set(), stop.wait()))
    keeper.start()
    try:
        done.wait(10)
        time.sleep(0.1)
        assert _threads() >= before + 2  # the keeper and at least one OpenMP worker
    finally:
        stop.set()
        keeper.join()
