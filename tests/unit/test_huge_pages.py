"""The entry points ask PyTorch for huge pages before torch is imported (glm_api/huge_pages.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from glm_api.huge_pages import VARIABLE, prefer_huge_pages

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import runpy, sys; sys.argv = ['api.py', '--help']\n"
    "try:\n    runpy.run_path('api.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
    "import os, torch\n"
    "big = torch.ones(64 * 2**20, dtype=torch.uint8)\n"
    "huge = [l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')]\n"
    "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), huge[0] if huge else 'unknown')\n"
)
MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _kernel_mode() -> str | None:
    """The kernel's transparent huge page mode (always, madvise, never), None where it has none."""
    try:
        text = MODE_FILE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def _probe(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.split()[-2:]


def test_api_py_turns_huge_pages_on_before_torch_allocates():
    mode = _kernel_mode()
    if mode in (None, "never"):
        pytest.skip(f"this kernel gives no transparent huge pages ({MODE_FILE}: {mode})")
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    variable, huge_kib = _probe(env)
    # Set before torch's first allocation: a 64 MiB tensor is mapped with huge pages.
    assert variable == "1" and int(huge_kib) >= 32 * 1024


def test_a_value_in_the_environment_is_kept():
    variable, huge_kib = _probe({**os.environ, VARIABLE: "0"})
    assert variable == "0"
    if _kernel_mode() == "madvise":  # huge pages only where asked for: none were
        assert int(huge_kib) < 32 * 1024


def test_too_late_once_torch_is_imported():
    import torch  # noqa: F401  (this test process has it already)

    assert prefer_huge_pages() is False
