"""Keys/values every request of a model attends to first, kept pinned in the KV pool (P-Tuning v2).

A P-Tuning v2 prefix (:mod:`glm_api.families.chatglm3.prefix_encoder`) is, per layer, a run of
``tokens`` keys and values that sit before every request's own keys: computed once at start-up,
written once into blocks of the paged pool, and put at the head of each of the model's rows'
block tables when a step is packed (:mod:`paged_attention`), so rows share those blocks as they
share prefix-cache blocks, never a copy per request. The blocks are taken from the pool at
start-up and never released: never evicted, never handed to a request, and a row's admission
counts only its own blocks. Each row that uses them holds a reference on them while it runs.

The prefix ends on a block boundary, so a row's own tokens start on a fresh block (its block
table and the prefix cache's digests work as for any row): when ``tokens`` is not a multiple of
the block size, the first ``hidden`` slots of the first block hold zeros that attention masks.
Prefix keys carry no rotary embedding (ChatGLM3 concatenates them as they come out of the
encoder), and the row's own positions start at 0: the prefix shifts where a row's keys sit in
its table, never its positions.

Rows of a prefixed model find in the prefix cache only blocks computed behind the same prefix:
their digest chains start from :attr:`PinnedPrefix.salt`, not from the empty beginning.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from glm_api.engines.kv_pool import KVPool


@dataclass(frozen=True, eq=False)
class PinnedPrefix:
    """A prefix's place in the pool: ``blocks`` (pinned), of which the first ``hidden`` slots
    are padding, then its ``tokens`` keys/values."""

    name: str
    tokens: int
    blocks: tuple[int, ...]
    hidden: int
    salt: bytes  # the root of its rows' prefix-cache digest chains

    def slots(self, block_size: int) -> int:
        """Slots the prefix takes at the head of a row's table: where the row's own keys begin."""
        return len(self.blocks) * block_size


def prefix_salt(name: str) -> bytes:
    """A digest root no token chain starts from: rows behind different prefixes (or none) never
    share a cached block."""
    return hashlib.blake2b(f"p-tuning v2 prefix {name}".encode(), digest_size=16).digest()


def write_prefix(pool: KVPool, blocks: list[int], key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Write each layer's prefix keys/values ``[kv_heads, tokens, head_dim]`` at the end of
    ``blocks`` (zeros before them); returns the padding slots (``hidden``)."""
    import torch

    if len(key_values) != pool.layout.num_layers:
        raise ValueError(f"the prefix has {len(key_values)} layers, the model {pool.layout.num_layers}")
    bs = pool.block_size
    tokens = key_values[0][0].shape[1]
    hidden = len(blocks) * bs - tokens
    if not 0 <= hidden < bs:
        raise ValueError(f"{len(blocks)} blocks of {bs} for a prefix of {tokens} tokens")
    for layer, (keys, values) in enumerate(key_values):
        if not pool.layout.layers[layer].direct:
            raise ValueError("a pinned prefix needs a model whose attention reads keys and values from the pool")
        flat_k, flat_v = pool.flat(layer)
        slots = torch.tensor(
            [b * bs + o for b in blocks for o in range(bs)], dtype=torch.long, device=flat_k.device
        )
        for flat, states in ((flat_k, keys), (flat_v, values)):
            if tuple(states.shape) != (flat.shape[0], tokens, flat.shape[2]):
                raise ValueError(
                    f"layer {layer}: prefix keys/values of shape {tuple(states.shape)}, the pool holds "
                    f"[{flat.shape[0]} kv heads, tokens, {flat.shape[2]}]"
                )
            padded = flat.new_zeros((flat.shape[0], len(blocks) * bs, flat.shape[2]))
            padded[:, hidden:] = states.to(device=flat.device, dtype=flat.dtype)
            flat.index_copy_(1, slots, padded)
    return hidden
