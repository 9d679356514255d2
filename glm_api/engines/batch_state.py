"""The running batch's KV cache: left-padded rows that join and leave between decode steps.

Why not transformers' own continuous batching (``generate_batch`` / paged attention)? On this
2-core CPU it reached ~43 tokens/s for 32 prompts, 0.37 of a static ``generate`` of the same
batch (DESIGN.md, "Performance anchors"), far from the 0.8 we aim at. A static batch is fast
because every step is one dense forward over ``[B, 1]`` with a ``[B, T]`` cache; this class
keeps exactly that layout while rows come and go:

- a new group of rows is prefilled on its own (left-padded to its longest prompt), then its
  cache is left-padded or the batch's is, to the longer of the two, and stacked under it;
- finished rows are dropped with ``batch_select_indices``, then columns that every remaining
  row has as padding are cut from the left, so the cache never outgrows its longest row.

The model sees what ``generate`` gives it for a left-padded batch: a 2D attention mask with
zeros on padding and per-row position ids, so each row's result matches it being run alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class BatchState:
    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T] long, 1 = real token

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def clear(self) -> None:
        self.cache = None
        self.mask = None

    def add(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Stack a freshly prefilled group of rows under the running ones."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.width, mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then trim all-padding columns on the left."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        first_used = int(self.mask.any(dim=0).nonzero()[0])
        if first_used > 0:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first_used:, :]
                layer.values = layer.values[:, :, first_used:, :]
            self.mask = self.mask[:, first_used:]

    def extend_mask(self) -> torch.Tensor:
        """The mask for the next decode step: every row gets one more real token."""
        ones = torch.ones((self.size, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - x.shape[-2]
    return x if missing == 0 else F.pad(x, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else F.pad(mask, (missing, 0))
