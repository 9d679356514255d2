"""bench/gpu_check.py on a host without CUDA: one clear SKIPPED line, exit 0, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA host runs the checks instead of skipping")
@pytest.mark.parametrize("extra", [[], ["--only-decode"]])
def test_without_a_gpu_it_says_skipped_and_exits_0(extra):
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", *extra], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: SKIPPED:") and "no CUDA device" in lines[0]
