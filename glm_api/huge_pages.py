"""Weights on transparent huge pages (issue 24).

A decode step streams every weight from memory once; with 4 KiB pages that is a TLB miss every
4 KiB of a few hundred megabytes. PyTorch's CPU allocator aligns allocations of 2 MiB and more
to 2 MiB and asks the kernel for huge pages on them (``madvise``) when ``THP_MEM_ALLOC_ENABLE``
is set, which matters where the kernel gives huge pages only on request
(``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, as on the dev VM). Measured
there (``bench/bench_decode.py``'s weights loop; the README's "Decode step" has the figures),
SmolLM2-135M's projections through oneDNN's packed linear read their weights ~10-15% faster.

PyTorch reads the variable once, at its first allocation, so it must be set before ``torch`` is
imported: the entry points (``api.py``, ``python -m glm_api``) call :func:`prefer_huge_pages`
first. A value already in the environment (``THP_MEM_ALLOC_ENABLE=0`` turns it off) is kept.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> bool:
    """Ask PyTorch for huge pages on large CPU tensors, unless the environment already says
    otherwise; False when torch was imported before (too late to take effect)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(VARIABLE, "1")
    return True
