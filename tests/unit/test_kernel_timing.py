"""Start-up kernel timing takes the fastest call, not the mean (a neighbour's slice of a core
inflates a mean by milliseconds)."""

from __future__ import annotations

import time

from glm_api.families.kernel_timing import fastest_ms


def test_the_fastest_call_counts_and_the_warm_up_does_not():
    durations = iter([0.05, 0.02, 0.002, 0.02] + [0.02] * 100)  # warm-up, then one fast call among slow ones
    calls = []

    def candidate():
        calls.append(1)
        time.sleep(next(durations))

    ms = fastest_ms(candidate, seconds=0.05)
    assert 2.0 <= ms < 15.0  # the 2 ms call, not the 20 ms ones
    assert len(calls) >= 4  # the warm-up and at least three timed calls in 0.05 s


def test_a_slow_candidate_is_still_timed_once():
    calls = []
    ms = fastest_ms(lambda: calls.append(time.sleep(0.03)), seconds=0.0)
    assert len(calls) == 2 and ms >= 30.0
