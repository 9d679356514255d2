"""What each engine step computes: decode tokens first, then prompt chunks, within the KV pool.

Every step (vLLM v1's policy, not nano-vllm's prefill-only steps, which stall streams):

1. each running row gets its next token if it is decoding, or its next prompt chunk if it is
   still prefilling (chunks share ``chunk_tokens`` per step, fewer while rows decode: see
   :mod:`pacing`), so streams keep flowing while a long prompt arrives;
2. a decoding row that needs a new block and finds none free preempts the newest running row:
   its blocks are released and it goes back to the front of the queue, to be recomputed later
   from its prompt and the tokens it already sent (its client sees nothing but a pause);
3. waiting requests start, first come first served, while the step has prompt budget, the batch
   has room and the pool has free blocks for the whole prompt (minus what the prefix cache
   already holds) plus a small reserve for the running rows' growth.

A waiting prompt that shares a beginning not yet in the pool with a prompt being prefilled in
this step waits one step: that beginning is then in the pool and it is not computed twice (a
wave of requests with one system prompt).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from glm_api.engines.kv_blocks import BlockManager, common_length
from glm_api.engines.kv_pool import KVPool
from glm_api.engines.pacing import PrefillPacer

#: A shared beginning shorter than this is not worth making a prompt wait a step.
MIN_SHARED_TOKENS = 16


@dataclass(eq=False)
class RowKV:
    """A row's place in the pool."""

    ids: list[int]  # every token the row knows: its prompt, then its output so far
    table: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys/values are in the pool
    hashed: int = 0  # leading blocks registered with the prefix cache
    parent: int | None = None  # hash of the last registered block
    cached: int | None = None  # prompt tokens found in the pool at first admission


class Scheduled(Protocol):
    kv: RowKV


@dataclass
class StepPlan:
    rows: list[tuple[Scheduled, int]] = field(default_factory=list)  # row, tokens it computes
    admitted: list[Scheduled] = field(default_factory=list)
    preempted: list[Scheduled] = field(default_factory=list)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, pool: KVPool, *, max_running: int, chunk_tokens: int, pacer: PrefillPacer | None = None
    ) -> None:
        self.blocks, self.pool = blocks, pool
        self.max_running = max_running
        self.chunk_tokens = chunk_tokens
        # While rows decode, how many prompt tokens a step may carry (None: always a full chunk).
        self.pacer = pacer
        # Free blocks kept back when admitting, so running rows can grow without preemption.
        self.watermark = max(1, blocks.num_blocks // 100)
        self.preemptions = 0

    def capacity_tokens(self) -> int:
        return (self.blocks.num_blocks - self.watermark) * self.blocks.block_size

    def schedule(self, running: list[Scheduled], waiting: deque[Scheduled]) -> StepPlan:
        """Plan the next step; moves admitted rows into ``running`` and preempted ones back to
        the front of ``waiting``."""
        plan = StepPlan()
        # Prompt tokens this step may carry: any prompt within ``budget``; a long one (longer than
        # a chunk) also within ``paced``, what the pacer allows beside decoding rows.
        budget = paced = self.chunk_tokens
        if self.pacer is not None:
            paced = self.pacer.budget(decoding=any(len(r.kv.ids) - r.kv.computed == 1 for r in running))

        def tokens_for(kv: RowKV, left: int) -> int:
            if left == 1:
                return 1
            return min(left, budget if len(kv.ids) <= self.chunk_tokens else min(budget, paced))

        for row in list(running):
            if row not in running:  # preempted earlier in this loop
                continue
            kv = row.kv
            left = len(kv.ids) - kv.computed
            n = tokens_for(kv, left)
            if n == 0:
                continue
            if not self._grow(row, kv.computed + n, running, waiting, plan):
                continue
            if left > 1:
                budget -= n
                paced -= n if len(kv.ids) > self.chunk_tokens else 0
            plan.rows.append((row, n))
        if plan.preempted:  # the pool is short: let the running rows finish first
            return plan
        prefilling = [row.kv.ids for row, n in plan.rows if n > 1]
        skipped = 0
        while len(waiting) > skipped and budget > 0 and len(running) < self.max_running:
            row = waiting[skipped]
            kv = row.kv
            hit = self.blocks.lookup(kv.ids)
            found = hit.tokens(self.blocks.block_size)
            if any(common_length(kv.ids, ids) - found >= MIN_SHARED_TOKENS for ids in prefilling):
                skipped += 1  # next step, that beginning is in the pool
                continue
            left = len(kv.ids) - found
            if tokens_for(kv, left) == 0:
                skipped += 1  # a long prompt waiting for the pacer: shorter ones may go first
                continue
            need = self.blocks.blocks_for(len(kv.ids)) - len(hit.blocks)
            if not self.blocks.can_allocate(need + self.watermark):
                break
            del waiting[skipped]
            self._admit(kv, hit, need)
            n = tokens_for(kv, left)
            budget -= n
            paced -= n if len(kv.ids) > self.chunk_tokens else 0
            running.append(row)
            plan.admitted.append(row)
            plan.rows.append((row, n))
            prefilling.append(kv.ids)
        return plan

    def _grow(self, row: Scheduled, tokens: int, running: list, waiting: deque, plan: StepPlan) -> bool:
        """Blocks for ``tokens`` tokens of ``row``, preempting the newest rows if needed; False if
        ``row`` itself had to go."""
        kv = row.kv
        need = self.blocks.blocks_for(tokens) - len(kv.table)
        while need > 0 and not self.blocks.can_allocate(need):
            victim = running[-1]
            self.preempt(victim, running, waiting)
            plan.preempted.append(victim)
            if victim is row:
                return False
        if need > 0:
            self._take(kv, need)
        return True

    def _admit(self, kv: RowKV, hit, need: int) -> None:
        self.blocks.share(hit.blocks)
        kv.table = list(hit.blocks)
        kv.hashed = len(hit.blocks)
        kv.parent = self.blocks.blocks[hit.blocks[-1]].hash if hit.blocks else None
        if hit.copy_from is not None and hit.copy_tokens:
            self.blocks.share([hit.copy_from])  # so allocating cannot hand it out before the copy
            self._take(kv, need)
            self.pool.copy_block(hit.copy_from, kv.table[len(hit.blocks)])
            self.blocks.release([hit.copy_from])
        else:
            self._take(kv, need)
        kv.computed = hit.tokens(self.blocks.block_size)
        if kv.cached is None:
            kv.cached = kv.computed

    def _take(self, kv: RowKV, count: int) -> None:
        new, first_use = self.blocks.allocate(count)
        self.pool.zero(first_use)
        kv.table += new

    def preempt(self, row: Scheduled, running: list, waiting: deque) -> None:
        running.remove(row)
        self.free(row.kv)
        waiting.appendleft(row)
        self.preemptions += 1

    def free(self, kv: RowKV) -> None:
        """Give a row's blocks back. Its last, partly filled block is registered too: a prompt
        that continues this row (the next turn of a conversation) copies what it holds."""
        start = kv.hashed * self.blocks.block_size
        if self.blocks.prefix_caching and start < kv.computed:
            self.blocks.register(kv.table[kv.hashed], kv.parent, tuple(kv.ids[start : kv.computed]))
        self.blocks.release(kv.table)
        kv.table, kv.computed, kv.hashed, kv.parent = [], 0, 0, None

    def computed(self, rows: Sequence[tuple[Scheduled, int]]) -> None:
        """After the step's forward: the tokens are in the pool; full blocks become findable."""
        bs = self.blocks.block_size
        for row, n in rows:
            kv = row.kv
            kv.computed += n
            while (kv.hashed + 1) * bs <= kv.computed:
                start = kv.hashed * bs
                kv.parent = self.blocks.register(kv.table[kv.hashed], kv.parent, tuple(kv.ids[start : start + bs]))
                kv.hashed += 1
