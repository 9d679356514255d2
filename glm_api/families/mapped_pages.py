"""Giving back the pages of a memory-mapped checkpoint as soon as a tensor is consumed.

A shard read through ``torch.load(mmap=True)`` or safetensors stays mapped until its last tensor
is freed, and every page read so far counts in the process's resident memory: loading
ChatGLM3-6B in int8 peaked at 9.7 GB with 6.8 GB of weights, the rest being the current
1.8 GB shard. ``madvise(MADV_DONTNEED)`` drops a range of a file-backed mapping from this
process; a later read faults it in again from the file, with the same bytes (the weights are
never written), so this is safe even if someone still holds a view. It is applied only to
ranges that ``/proc/self/maps`` shows as mappings of that very file, never to anonymous memory
(where it would zero live data). Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch

from glm_api.units import ceil_div

_MADV_DONTNEED = 4


class MappedFile:
    """The address ranges at which ``file`` is mapped into this process, read when created
    (create it after opening the file, while its tensors are alive)."""

    def __init__(self, file: Path) -> None:
        self.ranges: list[tuple[int, int]] = []
        self._madvise = None
        if not sys.platform.startswith("linux"):
            return
        target = os.path.realpath(file)
        try:
            lines = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5] == target:
                low, high = (int(x, 16) for x in parts[0].split("-"))
                self.ranges.append((low, high))
        self._madvise = ctypes.CDLL(None, use_errno=True).madvise if self.ranges else None

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages under ``tensor`` (a view: the span it covers) from this process, where
        the file maps them."""
        if self._madvise is None or tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        if tensor.is_contiguous():
            start = tensor.data_ptr()
            end = start + tensor.numel() * tensor.element_size()
        else:
            storage = tensor.untyped_storage()
            start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        page = mmap.PAGESIZE
        start, end = start // page * page, ceil_div(end, page) * page  # neighbours re-read from the file if needed
        for low, high in self.ranges:
            lo, hi = max(start, low), min(end, high)
            if lo < hi:
                self._madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
