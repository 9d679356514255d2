"""The running batch's KV cache: preallocated, left-padded rows that join and leave between steps.

Why not transformers' own continuous batching (``generate_batch`` / paged attention)? On this
2-core CPU it reached 0.37-0.53 of a static ``generate`` of the same 32 prompts (DESIGN.md,
"Performance anchors"; ``python bench/bench_chat.py --generate-batch``), short of the 0.8 we
aim at; this engine reaches ~1.0 (docs/performance.md). A static batch is fast because every
step is one dense forward over ``[B, 1]`` with a ``[B, T]`` cache; this class keeps exactly
that layout while rows come and go.

Why not ``DynamicCache``? It appends each step with ``torch.cat``, copying the whole cache of
every layer (~5-15% of a decode step at batch 32), and dropping a row copies it all again. Here
each layer owns buffers ``[rows, kv_heads, columns, head_dim]`` written in place:

- the live batch is rows ``[0, size)`` and columns ``[start, end)``; a decode step writes
  column ``end`` of every row and the model attends to a view of ``[start, end]``;
- a new group of rows is prefilled on its own (left-padded to its longest prompt), then copied
  into free rows, right-aligned at ``end`` (the window widens to the left if the group is wider);
- a finished row's slot is refilled by moving the last rows into it (a few rows copied, not the
  whole cache), and columns every remaining row has as padding are dropped from the window.

The model sees what ``generate`` gives it for a left-padded batch: a mask with zeros on padding
and per-row position ids, so each row's result matches it being run alone. Buffers start at
zero and padding only ever holds finite values, so masked columns cannot leak NaNs.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin

#: Spare columns allocated on the right at each (re)allocation (at least; a quarter of the
#: width when that is more), so the window is copied once every so many steps, not each step.
COLUMN_CHUNK = 64


def _spare(width: int) -> int:
    return max(COLUMN_CHUNK, width // 4)


class _WindowLayer(CacheLayerMixin):
    """One layer's view of the shared window: writes new keys/values in place, returns the window."""

    is_sliding = False

    def __init__(self, state: "BatchState") -> None:
        super().__init__()
        self.state = state
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("window layers are allocated by BatchState")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        s = self.state
        n = key_states.shape[-2]
        end = s.end + n
        self.keys[: s.size, :, s.end : end].copy_(key_states)
        self.values[: s.size, :, s.end : end].copy_(value_states)
        return self.keys[: s.size, :, s.start : end], self.values[: s.size, :, s.start : end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.state.width

    def get_max_length(self) -> int:
        return -1


class BatchState:
    """Owns the buffers; the engine keeps its request list in the same row order."""

    def __init__(self, max_rows: int = 1) -> None:
        self.max_rows = max_rows  # rows grow by doubling up to this, then as needed
        self.layers: list[_WindowLayer] = []
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns] bool, True = a real token
        self.row_start: list[int] = []  # first real column of each live row
        self.size = 0
        self.start = 0
        self.end = 0

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def capacity(self) -> tuple[int, int]:
        return (0, 0) if self.mask is None else tuple(self.mask.shape)

    def clear(self) -> None:
        self.layers, self.cache, self.mask = [], None, None
        self.row_start, self.size, self.start, self.end = [], 0, 0, 0

    # -- rows joining ------------------------------------------------------------------------

    def add(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Copy a freshly prefilled, left-padded group (``cache``, ``mask [g, w]``) under the live rows."""
        group, width = mask.shape
        if self.mask is None:
            self._allocate(cache, rows=group, width=width)
            self.start, self.end = 0, width
        else:
            left_room = self.end - width
            rows_needed = self.size + group
            if left_room < 0 or rows_needed > self.capacity[0]:
                rows = self.capacity[0]
                if rows_needed > rows:
                    rows = max(rows_needed, min(2 * rows, self.max_rows))
                self._relayout(rows=rows, left=max(0, -left_room))
        first, last = self.size, self.size + group
        begin = self.end - width
        for layer, new in zip(self.layers, cache.layers):
            layer.keys[first:last, :, begin : self.end].copy_(new.keys)
            layer.values[first:last, :, begin : self.end].copy_(new.values)
        self.mask[first:last].zero_()  # a reused slot may still hold an old row's mask
        self.mask[first:last, begin : self.end] = mask.to(torch.bool)
        self.row_start += [begin + int(mask[r].nonzero()[0]) for r in range(group)]
        self.size = last
        self.start = min(self.start, begin)

    def _allocate(self, cache: DynamicCache, rows: int, width: int) -> None:
        columns = width + _spare(width)
        self.layers = []
        for new in cache.layers:
            layer = _WindowLayer(self)
            k, v = new.keys, new.values
            layer.keys = torch.zeros((rows, k.shape[1], columns, k.shape[3]), dtype=k.dtype, device=k.device)
            layer.values = torch.zeros((rows, v.shape[1], columns, v.shape[3]), dtype=v.dtype, device=v.device)
            self.layers.append(layer)
        self.cache = Cache(layers=self.layers)
        self.mask = torch.zeros((rows, columns), dtype=torch.bool, device=cache.layers[0].keys.device)

    def _relayout(self, rows: int, left: int) -> None:
        """New buffers with ``rows`` rows and ``left`` more free columns before the window."""
        old_layers, old_mask = self.layers, self.mask
        width, size = self.width, self.size
        columns = left + width + _spare(left + width)
        self.layers = []
        for old in old_layers:
            layer = _WindowLayer(self)
            k, v = old.keys, old.values
            layer.keys = torch.zeros((rows, k.shape[1], columns, k.shape[3]), dtype=k.dtype, device=k.device)
            layer.values = torch.zeros((rows, v.shape[1], columns, v.shape[3]), dtype=v.dtype, device=v.device)
            layer.keys[:size, :, left : left + width] = k[:size, :, self.start : self.end]
            layer.values[:size, :, left : left + width] = v[:size, :, self.start : self.end]
            self.layers.append(layer)
        self.cache = Cache(layers=self.layers)
        self.mask = torch.zeros((rows, columns), dtype=torch.bool, device=old_mask.device)
        self.mask[:size, left : left + width] = old_mask[:size, self.start : self.end]
        shift = left - self.start
        self.row_start = [c + shift for c in self.row_start]
        self.start, self.end = left, left + width

    # -- decode steps ------------------------------------------------------------------------

    def step_mask(self) -> torch.Tensor:
        """Mark column ``end`` real for every row and return the ``[size, width + 1]`` mask view."""
        if self.end >= self.capacity[1]:
            self._relayout(rows=self.capacity[0], left=0)
        self.mask[: self.size, self.end] = True
        return self.mask[: self.size, self.start : self.end + 1]

    def advance(self) -> None:
        """After the forward pass wrote column ``end``: it is now part of the window."""
        self.end += 1

    # -- rows leaving ------------------------------------------------------------------------

    def remove(self, rows: set[int]) -> list[int]:
        """Drop these rows; returns, for each row left, the old index it came from.

        The rows after the new end move into the holes (only they are copied), so the caller
        must reorder its own per-row lists with the returned order.
        """
        if not rows:
            return list(range(self.size))
        new_size = self.size - len(rows)
        if new_size == 0:
            self.clear()
            return []
        order = list(range(new_size))
        holes = sorted(r for r in rows if r < new_size)
        movers = [r for r in range(new_size, self.size) if r not in rows]
        if holes:
            dst = torch.tensor(holes, device=self.mask.device)
            src = torch.tensor(movers, device=self.mask.device)
            window = slice(self.start, self.end)
            for layer in self.layers:
                layer.keys[:, :, window].index_copy_(0, dst, layer.keys[src, :, window])
                layer.values[:, :, window].index_copy_(0, dst, layer.values[src, :, window])
            self.mask.index_copy_(0, dst, self.mask[src])
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        self.row_start = [self.row_start[i] for i in order]
        self.size = new_size
        self.start = min(self.row_start)  # columns that are padding for every row left
        return order
