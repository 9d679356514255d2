"""The KV cache manager: the one owner of the pool's blocks.

It gives sequences their blocks and takes them back, finds prompt beginnings already in the pool
and records what new full blocks hold (the prefix cache, :mod:`kv_blocks`), and does the only
device work on blocks outside a model forward: zeroing blocks on first use and copying the part
of a cached block a new prompt shares (:mod:`kv_pool`). vLLM's ``KVCacheManager`` over its
``BlockPool`` is the model.

Bookkeeping and device work are split in time: everything that changes which block holds what
runs under the engine's lock (in the scheduler's admission, and after a step), so the event
loop may look up cached prefixes under the same lock and never sees it half-changed; the block
copies and zeroing that bookkeeping implies are only recorded there (:class:`BlockOps`) and done
by :meth:`KVCacheManager.apply` on the worker thread with the lock released, before the step's
forward, in the order they were recorded. A copy's source may be handed to another sequence in
the same plan: nothing writes a block before that step's forward, and the copy runs first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from glm_api.engines.kv_blocks import BlockManager, PrefixHit
from glm_api.engines.kv_pool import KVPool
from glm_api.engines.sequence import Sequence


@dataclass
class BlockOps:
    """Device work on blocks that a plan implies: zero new blocks first, then copy (src, dst)."""

    zero: list[int] = field(default_factory=list)
    copy: list[tuple[int, int]] = field(default_factory=list)


class KVCacheManager:
    def __init__(self, pool: KVPool, *, cached_blocks: int = 0) -> None:
        self.pool = pool
        self.blocks = BlockManager(pool.num_blocks, pool.block_size, cached_blocks=cached_blocks)
        self.block_size = pool.block_size
        self._ops = BlockOps()

    # -- counts (under the engine's lock) ------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def num_free(self) -> int:
        return self.blocks.num_free

    @property
    def num_used(self) -> int:
        return self.blocks.num_used

    @property
    def num_cached(self) -> int:
        return self.blocks.num_cached

    @property
    def prefix_caching(self) -> bool:
        return self.blocks.prefix_caching

    def blocks_for(self, tokens: int) -> int:
        return self.blocks.blocks_for(tokens)

    def can_allocate(self, count: int) -> bool:
        return self.blocks.can_allocate(count)

    # -- the prefix cache ----------------------------------------------------------------------

    def lookup(self, token_ids: list[int], root: bytes | None = None) -> PrefixHit:
        return self.blocks.lookup(token_ids, root)

    def cached_prefix_tokens(self, token_ids: list[int], root: bytes | None = None) -> int:
        return self.blocks.lookup(token_ids, root).tokens(self.block_size)

    # -- sequences -----------------------------------------------------------------------------

    def admit(self, seq: Sequence, hit: PrefixHit, need: int) -> None:
        """Give a starting sequence the blocks of its prefix hit and ``need`` new ones; the part
        of a cached block it shares is copied into the first new one."""
        self.blocks.share(hit.blocks)
        seq.block_table = list(hit.blocks)
        seq.num_hashed_blocks = len(hit.blocks)
        seq.last_digest = self.blocks.blocks[hit.blocks[-1]].digest if hit.blocks else seq.cache_root
        if hit.copy_from is not None and hit.copy_tokens:
            self.blocks.share([hit.copy_from])  # so allocating cannot hand it out to this sequence
            self.grow(seq, need)
            self._ops.copy.append((hit.copy_from, seq.block_table[len(hit.blocks)]))
            self.blocks.release([hit.copy_from])
        else:
            self.grow(seq, need)
        seq.num_computed_tokens = hit.tokens(self.block_size)
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = seq.num_computed_tokens

    def grow(self, seq: Sequence, count: int) -> None:
        new, first_use = self.blocks.allocate(count)
        self._ops.zero += first_use
        seq.block_table += new

    def free(self, seq: Sequence) -> None:
        """Give a sequence's blocks back. Its last, partly filled block is cached too: a prompt
        that continues this sequence (the next turn of a conversation) copies what it holds."""
        start = seq.num_hashed_blocks * self.block_size
        if self.blocks.prefix_caching and start < seq.num_computed_tokens:
            tokens = tuple(seq.token_ids[start : seq.num_computed_tokens])
            self.blocks.cache_block(seq.block_table[seq.num_hashed_blocks], seq.last_digest, tokens)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.num_computed_tokens, seq.num_hashed_blocks, seq.last_digest = [], 0, 0, None

    def computed(self, scheduled: Iterable[tuple[Sequence, int]]) -> None:
        """After a step's forward: its tokens are in the pool; full blocks become findable."""
        bs = self.block_size
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            while (seq.num_hashed_blocks + 1) * bs <= seq.num_computed_tokens:
                start = seq.num_hashed_blocks * bs
                tokens = tuple(seq.token_ids[start : start + bs])
                block = seq.block_table[seq.num_hashed_blocks]
                seq.last_digest = self.blocks.cache_block(block, seq.last_digest, tokens)
                seq.num_hashed_blocks += 1

    # -- device work (worker thread, lock released) ---------------------------------------------

    def take_block_ops(self) -> BlockOps:
        """What the bookkeeping since the last call asks of the pool (under the lock)."""
        ops, self._ops = self._ops, BlockOps()
        return ops

    def apply(self, ops: BlockOps) -> None:
        self.pool.zero(ops.zero)
        for src, dst in ops.copy:
            self.pool.copy_block(src, dst)
