"""A bounded soak against the shared live server (bench/soak.py runs the bigger one)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.e2e


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", REPO / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_mixed_load_with_disconnects_leaves_nothing_behind(live_server):
    soak = load_soak()
    report = soak.run(live_server.url, live_server.process.pid, requests=80, concurrency=12, seed=3, time_limit=400)
    soak.print_report(report, 80, 12)
    assert not report.failures, report.failures
    assert sum(report.outcomes.values()) == 80
    assert report.outcomes["stream: left mid-stream"] > 0 and report.outcomes["stream: complete"] > 0
    assert any(k.startswith("bad request: 4") for k in report.outcomes)
    assert report.running_after == 0 and report.waiting_after == 0  # read from /metrics
    assert report.rss_after_mb - report.rss_before_mb < 300  # no runaway growth
