"""Sizes: byte counts written for people (the start-up logs' sizes of weights, KV caches and
budgets), and how many fixed-size units (KV blocks, file pages) hold a count."""

from __future__ import annotations


def byte_size(size: float) -> str:
    """``size`` bytes in the largest binary unit it reaches (negative sizes too: a deficit)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size:.0f} B"


def ceil_div(count: int, size: int) -> int:
    """Units of ``size`` that hold ``count`` (the last one maybe partly filled)."""
    return -(-count // size)
