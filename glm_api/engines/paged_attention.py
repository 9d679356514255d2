"""Attention over the block pool, plugged into transformers' attention interface.

One engine step is one forward over every scheduled token packed into a ``[1, T]`` sequence: a
decode row adds one token, a prefilling row a chunk of its prompt. Projections, rotary and MLP
run on those T rows as one dense batch; only attention needs to know which tokens belong to
which row. It does so here, for any family whose attention layers call the configured
attention function (GLM/ChatGLM3, Llama and SmolLM2, GLM-4, Qwen2, ...):

- :class:`PagedCache` is passed as the model's ``cache``: each layer's ``update`` writes the
  new keys/values into their slots of the pool (before anything reads them);
- :func:`paged_attention` then reads, for each group of rows, the rows' own blocks back from
  the pool (one ``index_select`` per group and layer) and runs one ``scaled_dot_product_attention``
  with grouped-query heads (no key/value copies per query head).

Groups: decode rows of similar length share one padded call (the padding is masked, and a
bucket is cut where padding would cost more than the keys themselves), so 32 short streams are
one call per layer, and a long conversation does not pad the short ones; each prefilling row is
its own call, causal within its chunk and seeing its whole past. Measured on this CPU for the
ChatGLM3 shape (``../shared/PAGED_KV.md``): a per-row gather plus SDPA cost ~5 ms a layer where
the padded window cost 24-93 ms, and flex attention or transformers' paged SDPA (which loses
grouped-query attention to its mask) were slower.

Masks and tables are built once per step (:class:`PagedStep`) and reused by every layer (in a
model split over devices, copied once per device and step).
Called without a step (``model.generate``, a reference forward in a test), the same model runs
transformers' own SDPA attention, with its own masks: installing the engine changes nothing
for other users of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from glm_api.engines import paged_history
from glm_api.engines.decode_step import DecodeBatch
from glm_api.engines.kv_blocks import NULL_BLOCK
from glm_api.engines.kv_pool import KVPool
from glm_api.units import ceil_div

ATTENTION_NAME = "glm_api_paged"

#: A decode bucket grows while its padded keys stay under this factor of its real keys (plus
#: a few blocks' slack): one call for similar rows, separate calls for very different ones.
BUCKET_PADDING = 1.5
BUCKET_SLACK_TOKENS = 256


@dataclass
class ScheduledRow:
    """One row's part of a step: its block table, the tokens already in the pool, the new ones.
    With a pinned prefix (:mod:`pinned_prefix`) the table starts with the prefix's blocks:
    ``offset`` slots before the row's own tokens, of which the first ``hidden`` are never
    attended; positions still count the row's own tokens from 0."""

    table: list[int]
    past: int
    new_ids: list[int]
    offset: int = 0
    hidden: int = 0


@dataclass
class _Group:
    start: int  # first of its tokens in the packed sequence
    rows: int
    q_len: int  # tokens per row (1 for decode rows)
    kv_len: int  # keys each row may attend to (the longest, for a bucket)
    index: torch.Tensor  # [rows * n_blocks] block ids, padded with the null block
    n_blocks: int
    q_pos: torch.Tensor  # [rows, q_len] position of each query token
    mask: torch.Tensor | None  # [rows, 1, q_len, kv_len] True = attend; None = causal or full
    causal: bool
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The mask, narrowed to the last ``window`` keys of each query for sliding-window layers."""
        if window is None or self.kv_len <= window:
            return self.mask
        if window not in self._windowed:
            keys = torch.arange(self.kv_len, device=self.q_pos.device)
            q = self.q_pos[:, None, :, None]
            self._windowed[window] = (keys <= q) & (keys > q - window)
        return self._windowed[window]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float | None
    ) -> torch.Tensor:
        """The group's attention: ``q`` ``[rows, heads, q_len, d]`` over its rows' ``k``/``v``
        ``[rows, kv_heads, kv_len, d]``, causal unless ``mask`` says more."""
        return F.scaled_dot_product_attention(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=mask,
            is_causal=self.causal and mask is None,
            scale=scaling,
            enable_gqa=k.shape[1] != q.shape[1],
        )

    def moved_to(self, device: torch.device) -> _Group:
        mask = None if self.mask is None else self.mask.to(device)
        return replace(self, index=self.index.to(device), q_pos=self.q_pos.to(device), mask=mask, _windowed={})


@dataclass
class PagedStep:
    """Everything one forward needs, computed once: the packed ids and positions, the slots the
    new keys/values go to, the attention groups, and where each row's last token sits."""

    pool: KVPool
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    slots: torch.Tensor  # [T]
    groups: list[_Group]
    last_index: list[int]  # per scheduled row (in the order given): its last token in [0, T)
    _copies: dict[torch.device, PagedStep] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> PagedStep:
        """The step with its slots and groups on ``device``: itself on the device it was built
        on; elsewhere (a model split over devices) a copy the first layer there makes and the
        device's other layers reuse, so index tensors cross once per device and step."""
        if device == self.slots.device:
            return self
        if device not in self._copies:
            groups = [g.moved_to(device) for g in self.groups]
            self._copies[device] = replace(self, slots=self.slots.to(device), groups=groups, _copies={})
        return self._copies[device]

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for the model's forward. The 4D placeholder mask makes transformers
        skip building a mask (attention here builds its own, once per step); a model with a
        key indexer scores keys under the step's packed mask (:mod:`paged_history`)."""
        if self.pool.layout.indexed:
            mask = paged_history.packed_mask(self)
        else:
            mask = self.input_ids.new_ones((1, 1, 1, 1), dtype=torch.bool)
        return {
            "input_ids": self.input_ids,
            "position_ids": self.positions,
            "attention_mask": mask,
            "cache": PagedCache(self),
            "use_cache": True,
            "paged_step": self,
        }

    @classmethod
    def build(cls, pool: KVPool, rows: list[ScheduledRow]) -> "PagedStep":
        bs, device = pool.block_size, pool.device
        decode = sorted(
            (i for i, r in enumerate(rows) if len(r.new_ids) == 1), key=lambda i: rows[i].offset + rows[i].past
        )
        prefill = [i for i, r in enumerate(rows) if len(r.new_ids) > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_index = [0] * len(rows)
        groups: list[_Group] = []

        def place(i: int) -> None:
            row = rows[i]
            for k, token in enumerate(row.new_ids):
                pos = row.past + k
                at = row.offset + pos  # its key's index in the row's table
                ids.append(token)
                positions.append(pos)
                slots.append(row.table[at // bs] * bs + at % bs)
            last_index[i] = len(ids) - 1

        for bucket in _buckets(decode, rows):
            start = len(ids)
            for i in bucket:
                place(i)
            lengths = [rows[i].offset + rows[i].past + 1 for i in bucket]
            kv_len = max(lengths)
            n_blocks = ceil_div(kv_len, bs)
            table = [b for i in bucket for b in _padded(rows[i].table, n_blocks)]
            q_pos = torch.tensor(lengths, device=device)[:, None] - 1
            mask = None
            if min(lengths) != kv_len:
                mask = torch.arange(kv_len, device=device) < torch.tensor(lengths, device=device)[:, None]
                mask = mask[:, None, None, :]
            mask = _hide(mask, [rows[i].hidden for i in bucket], (len(bucket), 1, 1, kv_len), device)
            groups.append(
                _Group(start, len(bucket), 1, kv_len, torch.tensor(table, device=device), n_blocks, q_pos, mask, False)
            )
        for i in prefill:
            start = len(ids)
            place(i)
            row = rows[i]
            past = row.offset + row.past  # keys before its first new token (the prefix's too)
            q_len, kv_len = len(row.new_ids), past + len(row.new_ids)
            n_blocks = ceil_div(kv_len, bs)
            q_pos = torch.arange(past, kv_len, device=device)[None, :]
            mask = None
            if past:  # causal, aligned at the end: query k sees keys up to past + k
                mask = torch.ones((q_len, kv_len), dtype=torch.bool, device=device).tril(diagonal=past)[None, None]
            mask = _hide(mask, [row.hidden], (1, 1, q_len, kv_len), device)
            groups.append(
                _Group(
                    start,
                    1,
                    q_len,
                    kv_len,
                    torch.tensor(row.table[:n_blocks], device=device),
                    n_blocks,
                    q_pos,
                    mask,
                    past == 0,
                )
            )
        return cls(
            pool=pool,
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            positions=torch.tensor([positions], dtype=torch.long, device=device),
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            groups=groups,
            last_index=last_index,
        )


def _hide(
    mask: torch.Tensor | None, hidden: list[int], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor | None:
    """``mask`` with each row's first ``hidden`` keys (a pinned prefix's padding) masked out."""
    if not any(hidden):
        return mask
    if mask is None:  # only reached with a prefix before the keys: never causal within them alone
        mask = torch.ones(shape, dtype=torch.bool, device=device)
    else:
        mask = mask.expand(shape).clone()
    for r, h in enumerate(hidden):
        mask[r, ..., :h] = False
    return mask


def _padded(table: list[int], n: int) -> list[int]:
    return table[:n] + [NULL_BLOCK] * (n - len(table))


def _buckets(order: list[int], rows: list[ScheduledRow]) -> list[list[int]]:
    """Cut decode rows (sorted by length) into runs whose padding stays small."""
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        length = rows[i].offset + rows[i].past + 1
        if current and (len(current) + 1) * length > BUCKET_PADDING * (total + length) + BUCKET_SLACK_TOKENS:
            out.append(current)
            current, total = [], 0
        current.append(i)
        total += length
    if current:
        out.append(current)
    return out


class PagedCache:
    """The ``cache`` a paged step passes to the model: writes each layer's new keys/values into
    the pool at the step's slots. Attention reads them back in :func:`paged_attention`."""

    is_compileable = False

    def __init__(self, step: PagedStep) -> None:
        self.step = step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if not self.step.pool.layout.layers[layer_idx].direct:  # latent attention: its history back
            return paged_history.update(self.step, layer_idx, key_states, value_states)
        keys, values = self.step.pool.flat(layer_idx)
        slots = self.step.on(keys.device).slots
        keys.index_copy_(1, slots, key_states[0].to(keys.dtype))
        values.index_copy_(1, slots, value_states[0].to(values.dtype))
        return key_states, value_states

    def update_indexer(self, key_states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        return paged_history.update_indexer(self.step, layer_idx, key_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_step: PagedStep | None = None,
    sliding_window: int | None = None,
    paged_decode: DecodeBatch | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[1, heads, T, d]`` of the packed step; returns ``[1, T, heads, d]``."""
    if paged_decode is not None:  # a decode-only step (glm_api/engines/decode_step.py)
        return paged_decode.attend(module.layer_idx, query, key, value, scaling), None
    indices = kwargs.pop("indices", None)  # a key indexer's top-k (glm_moe_dsa)
    if paged_step is None:  # not an engine step: plain SDPA with transformers' mask
        if indices is not None:
            attention_mask = paged_history.sparse_mask(attention_mask, indices, key.shape[2])
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
    pool = paged_step.pool
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    if not pool.layout.layers[module.layer_idx].direct:
        out = paged_history.attention(module, query, key, value, paged_step, scaling, window, indices)
        return out, None
    k_pool, v_pool = pool.keys[module.layer_idx], pool.values[module.layer_idx]
    kv_heads, heads, d = k_pool.shape[0], query.shape[1], query.shape[3]
    out = query.new_empty((1, query.shape[2], heads, d))
    for g in paged_step.on(k_pool.device).groups:
        width = g.n_blocks * pool.block_size
        k = k_pool.index_select(1, g.index).view(kv_heads, g.rows, width, d)[:, :, : g.kv_len].transpose(0, 1)
        v = v_pool.index_select(1, g.index).view(kv_heads, g.rows, width, d)[:, :, : g.kv_len].transpose(0, 1)
        n = g.rows * g.q_len
        q = query[0, :, g.start : g.start + n].reshape(heads, g.rows, g.q_len, d).transpose(0, 1)
        o = g.attend(q, k, v, g.mask_for(window), scaling)
        out[0, g.start : g.start + n] = o.transpose(1, 2).reshape(n, heads, d)
    return out, None


def install(model: torch.nn.Module) -> None:
    """Make ``model``'s attention layers use :func:`paged_attention` in engine steps (and SDPA,
    with SDPA's masks, in any other forward)."""
    if not model.is_backend_compatible():  # its layers would ignore the pool and attend to one step only
        raise ValueError(
            f"{type(model).__name__} does not take its attention function from transformers' attention "
            "interface, so this server cannot batch it over its KV cache"
        )
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)
