"""Paged steps for layers that transform their cache entries before attention (latent attention).

A direct layer (:mod:`cache_layout`) hands keys and values to the cache and attention reads them
back from the pool (:func:`~glm_api.engines.paged_attention.paged_attention`). A latent layer
(``glm4_moe_lite``, ``glm_moe_dsa``: DeepSeek-style MLA) hands over a compressed latent and a rope
key, and expands whatever ``cache.update`` returns into per-head keys and values with its own
weights: so ``update`` here writes the new entries at the step's slots and returns each row's
whole history, gathered from its blocks, packed group after group (a decode bucket's rows each
padded to the bucket's length, then each prefilling row): ``[1, heads, N, dim]`` with
``N = sum(rows * kv_len)`` over the step's groups. The layer expands that with its own code (as
it does with transformers' caches) and attention, here, cuts each group's keys and values back
out of the packed run.

GLM-5's indexer (``cache.update_indexer``) gets its keys back in the same packed order, and picks
its top-k keys per query over the packed run under the step's packed mask (each query sees its
own row's keys, causally, and nothing else); attention then keeps, per query, the keys both the
mask and the indexer allow, as transformers' own SDPA path does. The indexer, being the model's
own code, scores every query of the step against every packed key (other rows' masked): its cost
grows with rows x keys, not each row's own keys; a per-row indexer would remove that.

Costs as in transformers' caches: the expansion runs over every attended token at every step
(the absorbed-weights MLA kernels that avoid it are not implemented here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from glm_api.engines.paged_attention import PagedStep


def _offsets(step: PagedStep) -> list[int]:
    """Where each group's rows start in the packed history."""
    out, at = [], 0
    for g in step.groups:
        out.append(at)
        at += g.rows * g.kv_len
    return out + [at]


def gather(step: PagedStep, layer: int, entry: int) -> torch.Tensor:
    """Entry ``entry`` of ``layer`` for every row of the step, packed: ``[heads, N, dim]``."""
    pool = step.pool
    t = pool.entries[layer][entry]
    heads, dim = t.shape[0], t.shape[3]
    parts = []
    for g in step.groups:
        width = g.n_blocks * pool.block_size
        rows = t.index_select(1, g.index).view(heads, g.rows, width, dim)[:, :, : g.kv_len]
        parts.append(rows.reshape(heads, g.rows * g.kv_len, dim))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def write(step: PagedStep, layer: int, entry: int, states: torch.Tensor) -> None:
    """New tokens' ``[1, heads, T, dim]`` states into their slots."""
    flat = step.pool.flat_entry(layer, entry)
    flat.index_copy_(1, step.on(flat.device).slots, states[0].to(flat.dtype))


def update(step: PagedStep, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
    """``cache.update`` of a latent layer: write, then hand back the packed history."""
    write(step, layer, 0, key_states)
    write(step, layer, 1, value_states)
    local = step.on(step.pool.entries[layer][0].device)
    keys, values = gather(local, layer, 0), gather(local, layer, 1)
    return keys[None].to(key_states.dtype), values[None].to(value_states.dtype)


def update_indexer(step: PagedStep, layer: int, key_states: torch.Tensor) -> torch.Tensor:
    """``cache.update_indexer``: ``[1, T, dim]`` in, the packed ``[1, N, dim]`` history out."""
    write(step, layer, 2, key_states[:, None])
    local = step.on(step.pool.entries[layer][2].device)
    return gather(local, layer, 2).to(key_states.dtype)


def packed_mask(step: PagedStep) -> torch.Tensor:
    """``[1, 1, T, N]``: True where a query may see a key of the packed history (its own row's,
    up to its own position). The indexer scores keys under it."""
    offsets = _offsets(step)
    T = step.input_ids.shape[1]
    mask = torch.zeros((T, offsets[-1]), dtype=torch.bool, device=step.input_ids.device)
    for g, off in zip(step.groups, offsets):
        keys = torch.arange(g.kv_len, device=mask.device)
        allowed = keys[None, None, :] <= g.q_pos[:, :, None]  # [rows, q_len, kv_len]
        for r in range(g.rows):
            q0, k0 = g.start + r * g.q_len, off + r * g.kv_len
            mask[q0 : q0 + g.q_len, k0 : k0 + g.kv_len] = allowed[r]
    return mask[None, None]


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    step: PagedStep,
    scaling: float | None,
    window: int | None,
    indices: torch.Tensor | None,
) -> torch.Tensor:
    """``query`` ``[1, heads, T, dq]`` over the packed ``key``/``value`` ``[1, kv_heads, N, d]``
    from :func:`update`; returns ``[1, T, heads, dv]``."""
    step = step.on(query.device)
    heads, kv_heads, dq, dv = query.shape[1], key.shape[1], query.shape[3], value.shape[3]
    out = query.new_empty((1, query.shape[2], heads, dv))
    selected = None
    if indices is not None:  # the indexer's top-k per query, as positions in the packed history
        selected = torch.zeros((query.shape[2], key.shape[2]), dtype=torch.bool, device=query.device)
        selected.scatter_(1, indices[0].long(), True)
    for g, off in zip(step.groups, _offsets(step)):
        n, span = g.rows * g.q_len, g.rows * g.kv_len
        k = key[0, :, off : off + span].reshape(kv_heads, g.rows, g.kv_len, -1).transpose(0, 1)
        v = value[0, :, off : off + span].reshape(kv_heads, g.rows, g.kv_len, dv).transpose(0, 1)
        q = query[0, :, g.start : g.start + n].reshape(heads, g.rows, g.q_len, dq).transpose(0, 1)
        mask = g.mask_for(window)
        if selected is not None:
            own = selected[g.start : g.start + n, off : off + span].view(g.rows, g.q_len, g.rows, g.kv_len)
            own = own.diagonal(dim1=0, dim2=2).permute(2, 0, 1)[:, None]  # each row's queries over its own keys
            keys = torch.arange(g.kv_len, device=query.device)
            causal = keys[None, None, None, :] <= g.q_pos[:, None, :, None]
            mask = own & (causal if mask is None else mask)
        o = g.attend(q, k, v, mask, scaling)
        out[0, g.start : g.start + n] = o.transpose(1, 2).reshape(n, heads, dv)
    return out


def sparse_mask(attention_mask: torch.Tensor | None, indices: torch.Tensor, keys: int) -> torch.Tensor:
    """Outside engine steps: the model's bool mask narrowed to the indexer's top-k keys (what
    transformers' SDPA path does for these models)."""
    batch, q_len = indices.shape[:2]
    selected = torch.zeros((batch, q_len, keys), dtype=torch.bool, device=indices.device)
    selected.scatter_(-1, indices.long(), True)
    selected = selected[:, None]
    if attention_mask is None:
        return selected & torch.ones((q_len, keys), dtype=torch.bool, device=indices.device).tril(keys - q_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask & selected
    return attention_mask.masked_fill(~selected, torch.finfo(attention_mask.dtype).min)


