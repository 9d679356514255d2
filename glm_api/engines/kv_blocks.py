"""Which KV blocks each row holds, which are free, and which hold a known run of tokens.

The keys/values of every running row live in fixed-size blocks of one shared pool (see
:mod:`kv_pool`); a row's *block table* lists its blocks in order, so a row holds memory for its
own tokens only, never padding up to the longest row. This module is the bookkeeping, with no
tensors (vLLM's ``BlockPool`` / nano-vllm's ``BlockManager`` are the models):

- a block has a reference count; a row takes one reference on each block of its table;
- a block whose last reference goes is *free*, but a full one keeps what it holds: while nobody
  reuses it, a later prompt that begins with the same tokens takes it back (the prefix cache).
  Blocks that hold nothing findable are reused first, then cached ones least recently freed
  first; at most ``cached_blocks`` free blocks stay cached, so the memory the server has
  touched stays near what its rows hold plus that bound;
- a full block is known by a digest (BLAKE2b, 128 bits) of its tokens chained to the digest of
  the block before it, so one digest names a whole beginning, and two different beginnings
  never share one in practice (Python's ``hash()`` of a tuple, 64 bits and not made to resist
  collisions, would splice another prompt's keys into a request on a collision); a hit's tokens
  are compared too. A lookup walks a prompt's full blocks until the first miss;
  after it, the block that shares the most of the next tokens can be *copied* (so a system
  prompt that ends in the middle of a block is still reused to the token).

Block 0 is never handed out: block tables are padded with it, and it stays zero.
Only the :mod:`kv_cache_manager` uses it, under the engine's lock: nothing here is locked.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from glm_api.units import ceil_div

NULL_BLOCK = 0


@dataclass(eq=False)
class Block:
    id: int
    refs: int = 0
    digest: bytes | None = None  # set once the block is cached (full, or a finished row's last)
    parent: bytes | None = None  # digest of the block before it (None: the first block of a prompt)
    tokens: tuple[int, ...] = ()  # what a cached block holds, checked on every hit


@dataclass
class PrefixHit:
    """A beginning of a prompt already in the pool: ``blocks`` are shared whole, then the first
    ``copy_tokens`` slots of ``copy_from`` hold the next tokens (copied into a new block)."""

    blocks: list[int] = field(default_factory=list)
    copy_from: int | None = None
    copy_tokens: int = 0

    def tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size + self.copy_tokens


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, cached_blocks: int = 0) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks")
        self.block_size = block_size
        self.cached_blocks = cached_blocks
        self.prefix_caching = cached_blocks > 0
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK].refs = 1  # padding target: never free, never written
        # Free blocks holding nothing findable, in reuse order (recycled ones first, then blocks
        # never used yet, whose memory the OS has not even backed), and free blocks still
        # findable by digest, least recently freed first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._by_digest: dict[bytes, int] = {}
        self._children: dict[bytes | None, set[int]] = {}  # parent digest -> cached blocks after it
        self._used_once = [False] * num_blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) - 1  # block 0 is not usable

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Free blocks still findable by the prefix cache."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return ceil_div(tokens, self.block_size)

    # -- prefix lookup -------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int], salt: bytes | None = None) -> PrefixHit:
        """The longest beginning of ``tokens`` in the pool, leaving at least one token to compute
        (its logits give the next token). ``salt``: the root of the chain (what besides the
        tokens decides the blocks' keys/values, a pinned prefix, a LoRA adapter; None for the base model alone):
        only blocks cached under the same salt match."""
        hit = PrefixHit()
        if not self.prefix_caching:
            return hit
        bs, limit = self.block_size, len(tokens) - 1
        parent: bytes | None = salt
        while (len(hit.blocks) + 1) * bs <= limit:
            start = len(hit.blocks) * bs
            chunk = tuple(tokens[start : start + bs])
            block_id = self._by_digest.get(chain_digest(parent, chunk))
            if block_id is None or self.blocks[block_id].tokens != chunk or self.blocks[block_id].parent != parent:
                break
            hit.blocks.append(block_id)
            parent = self.blocks[block_id].digest
        start = len(hit.blocks) * bs
        rest = tokens[start : min(limit, start + bs)]
        best = 0
        for block_id in self._children.get(parent, ()):
            shared = common_length(self.blocks[block_id].tokens, rest)
            if shared > best:
                best, hit.copy_from = shared, block_id
        hit.copy_tokens = best
        return hit

    # -- taking and giving back ----------------------------------------------------------------

    def can_allocate(self, count: int) -> bool:
        return count <= self.num_free

    def allocate(self, count: int) -> tuple[list[int], list[int]]:
        """``count`` blocks for a row, and which of them are used for the first time (their
        memory must be zeroed). The caller checked :meth:`can_allocate`."""
        if count > self.num_free:
            raise MemoryError(f"{count} KV blocks asked, {self.num_free} free")
        out, first_use = [], []
        for _ in range(count):
            block_id, _ = (self._free or self._cached).popitem(last=False)
            block = self.blocks[block_id]
            self._forget(block)
            block.refs = 1
            out.append(block_id)
            if not self._used_once[block_id]:
                self._used_once[block_id] = True
                first_use.append(block_id)
        return out, first_use

    def share(self, block_ids: Sequence[int]) -> None:
        """Take a reference on blocks found by :meth:`lookup` (cached free ones are taken back)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.refs == 0:
                del self._cached[block_id]
            block.refs += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop a row's references. Its last blocks are cached first, so its beginning, which
        other prompts are likeliest to share, is the last of it to be evicted."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.refs -= 1
            if block.refs > 0:
                continue
            if block.digest is None:  # nothing findable in it: reuse it first
                self._free[block_id] = None
                self._free.move_to_end(block_id, last=False)
            else:
                self._cached[block_id] = None
        while len(self._cached) > self.cached_blocks:  # evict: forget, and reuse first
            block_id, _ = self._cached.popitem(last=False)
            self._forget(self.blocks[block_id])
            self._free[block_id] = None
            self._free.move_to_end(block_id, last=False)

    def cache_block(self, block_id: int, parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
        """Record that a block holds ``tokens`` after the beginning ``parent``; its digest. A full
        block can then be shared whole; a partly filled one (a finished row's last) only copied."""
        block = self.blocks[block_id]
        if block.digest is not None:
            return block.digest
        digest = chain_digest(parent, tokens)
        if not self.prefix_caching:
            return digest
        block.digest, block.parent, block.tokens = digest, parent, tokens
        self._by_digest.setdefault(digest, block_id)
        self._children.setdefault(parent, set()).add(block_id)
        return digest

    def _forget(self, block: Block) -> None:
        if block.digest is None:
            return
        if self._by_digest.get(block.digest) == block.id:
            del self._by_digest[block.digest]
        siblings = self._children.get(block.parent)
        if siblings is not None:
            siblings.discard(block.id)
            if not siblings:
                del self._children[block.parent]
        block.digest, block.parent, block.tokens = None, None, ()


def chain_digest(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """The digest of a block holding ``tokens`` after the beginning whose digest is ``parent``."""
    h = hashlib.blake2b(parent or bytes(16), digest_size=16)  # fixed framing: 16 bytes, then the ids
    h.update(array("q", tokens).tobytes())
    return h.digest()


def join_salts(first: bytes | None, second: bytes) -> bytes:
    """One chain root for rows whose keys/values depend on two things (a pinned prefix and a
    LoRA adapter): equal only when both are."""
    return second if first is None else hashlib.blake2b(first + second, digest_size=16).digest()
