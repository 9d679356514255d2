"""What each engine step computes: decode tokens first, then prompt chunks, within the KV pool.

Every step (vLLM v1's policy, not nano-vllm's prefill-only steps, which stall streams):

1. each running row gets its next token if it is decoding, or its next prompt chunk if it is
   still prefilling (chunks share ``chunk_tokens`` per step, fewer while rows decode: see
   :mod:`pacing`), so streams keep flowing while a long prompt arrives;
2. a decoding row that needs a new block and finds none free preempts the newest running row
   of the lowest priority (batch lines before interactive requests): its blocks are released
   and it goes back to the front of its priority's place in the queue, to be recomputed later
   from its prompt and the tokens it already sent (its client sees nothing but a pause);
3. waiting requests start, first come first served, while the step has prompt budget, the batch
   has room and the pool has free blocks for the whole prompt (minus what the prefix cache
   already holds) plus a small reserve for the running rows' growth;
4. short prompts (a chunk or less) come before long ones: a short request that arrives while a
   long prompt prefills starts in the next step beside it, not after its last chunk (vLLM's
   ``long_prefill_token_threshold`` has the same aim). The long prompt keeps what the pacer
   grants it, so a stream of short requests cannot starve it (the bound: :mod:`pacing`).

The scheduler is policy only: it reads the sequences' state and the KV cache manager's counts,
asks the manager for blocks, and returns a :class:`SchedulerPlan`; it holds no tensors and does
no device work (the block copies and zeroing its decisions imply are recorded by the manager and
done outside the engine's lock).

A waiting prompt that shares a beginning not yet in the pool with a prompt being prefilled in
this step waits one step: that beginning is then in the pool and it is not computed twice (a
wave of requests with one system prompt). A prompt whose log-probabilities are wanted
(``Sequence.scores_prompt``) takes nothing from the prefix cache and never waits for it: every
one of its positions is computed (its full blocks still become findable for others).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from glm_api.engines.kv_blocks import PrefixHit, common_length
from glm_api.engines.kv_cache_manager import KVCacheManager
from glm_api.engines.pacing import PrefillPacer
from glm_api.engines.sequence import Sequence

#: A shared beginning shorter than this is not worth making a prompt wait a step.
MIN_SHARED_TOKENS = 16


class Scheduled(Protocol):
    seq: Sequence
    priority: int  # 0 interactive; higher runs later and is preempted first (batch lines)


def enqueue(waiting: deque, req: Scheduled, *, front: bool = False) -> None:
    """Queue ``req`` behind every waiting request of its priority or a more urgent one (at the
    front of its own priority with ``front``), so an interactive request never waits behind a
    batch line."""
    for i, other in enumerate(waiting):
        if other.priority > req.priority or (front and other.priority == req.priority):
            waiting.insert(i, req)
            return
    waiting.append(req)


@dataclass
class SchedulerPlan:
    scheduled: list[tuple[Scheduled, int]] = field(default_factory=list)  # request, tokens it computes
    admitted: list[Scheduled] = field(default_factory=list)
    preempted: list[Scheduled] = field(default_factory=list)
    long_tokens: int = 0  # prompt tokens of long prompts (as classified when planned), for the pacer


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, *, max_running: int, chunk_tokens: int, pacer: PrefillPacer | None = None
    ) -> None:
        self.kv = kv
        self.max_running = max_running
        self.chunk_tokens = chunk_tokens
        # While rows decode, how many prompt tokens a step may carry (None: always a full chunk).
        self.pacer = pacer
        # Free blocks kept back when admitting, so running rows can grow without preemption.
        self.watermark = max(1, kv.num_blocks // 100)
        self.preemptions = 0

    def capacity_tokens(self) -> int:
        return (self.kv.num_blocks - self.watermark) * self.kv.block_size

    def is_long(self, seq: Sequence) -> bool:
        """A prompt longer than a chunk: prefilled over several steps, paced, and never ahead of
        a short prompt."""
        return len(seq.token_ids) > self.chunk_tokens

    def schedule(self, running: list[Scheduled], waiting: deque[Scheduled]) -> SchedulerPlan:
        """Plan the next step; moves admitted requests into ``running`` and preempted ones back
        to the front of ``waiting``.

        Claims on the step's prompt budget, in order: running requests' decode tokens and short
        prompts' chunks, waiting short prompts, running long prompts' chunks (within what the
        pacer grants them, which shorter prompts never take: see :mod:`pacing`), waiting long
        prompts. So a short request arriving while a long prompt prefills starts in the next
        step, beside it."""
        plan = SchedulerPlan()
        budget = self.chunk_tokens
        competing = any(r.seq.num_uncomputed_tokens == 1 for r in running) or any(
            not self.is_long(r.seq) for r in waiting
        )
        paced = self.pacer.budget(competing) if self.pacer is not None else self.chunk_tokens
        long_prefills: list[Scheduled] = []
        for req in list(running):
            if req not in running:  # preempted earlier in this loop
                continue
            seq = req.seq
            left = seq.num_uncomputed_tokens
            if left > 1 and self.is_long(seq):
                long_prefills.append(req)  # after the short prompts; its blocks came at admission
                continue
            n = min(left, budget) if left > 1 else left
            if n == 0 or not self._grow(req, seq.num_computed_tokens + n, running, waiting, plan):
                continue
            budget -= n if left > 1 else 0
            plan.scheduled.append((req, n))
        if plan.preempted:  # the pool is short: let the running rows finish first
            return plan
        # What the pacer grants the running long prompts is theirs; shorter prompts take the rest.
        grant = min(paced, sum(r.seq.num_uncomputed_tokens for r in long_prefills))
        prefilling = [req.seq for req, n in plan.scheduled if n > 1]
        budget = grant + self._admit_waiting(plan, running, waiting, prefilling, budget - grant, paced, long=False)
        for req in long_prefills:
            n = min(req.seq.num_uncomputed_tokens, budget, paced)
            if n > 0:
                budget -= n
                paced -= n
                plan.scheduled.append((req, n))
                plan.long_tokens += n if n > 1 else 0
                prefilling.append(req.seq)
        self._admit_waiting(plan, running, waiting, prefilling, budget, paced, long=True)
        return plan

    def _admit_waiting(
        self, plan: SchedulerPlan, running: list, waiting: deque, prefilling: list, budget: int, paced: int, *,
        long: bool,
    ) -> int:
        """Start waiting requests (the short ones; any, with ``long``) first come first served
        while the step has budget, the batch has room and the pool has blocks; returns the
        budget left."""
        skipped = 0
        while len(waiting) > skipped and budget > 0 and len(running) < self.max_running:
            req = waiting[skipped]
            seq = req.seq
            is_long = self.is_long(seq)
            if not long and is_long:
                skipped += 1
                continue
            # A prompt that is scored computes every position: nothing from the prefix cache.
            hit = PrefixHit() if seq.scores_prompt else self.kv.lookup(seq.token_ids, seq.cache_salt)
            found = hit.tokens(self.kv.block_size)
            if not seq.scores_prompt and self.kv.prefix_caching and any(
                common_length(seq.token_ids, other.token_ids) - found >= MIN_SHARED_TOKENS
                for other in prefilling
                if other.cache_salt == seq.cache_salt  # another prefix's or adapter's blocks are never shared
            ):
                skipped += 1  # next step, that beginning is in the pool
                continue
            left = len(seq.token_ids) - found
            n = min(left, budget, paced) if is_long else min(left, budget)
            if n == 0:
                skipped += 1  # a long prompt waiting for the pacer: shorter ones may go first
                continue
            need = self.kv.blocks_for(len(seq.token_ids)) - len(hit.blocks)
            if not self.kv.can_allocate(need + self.watermark):
                break
            del waiting[skipped]
            self.kv.admit(seq, hit, need)
            budget -= n
            if is_long:
                paced -= n
                plan.long_tokens += n if n > 1 else 0
            running.append(req)
            plan.admitted.append(req)
            plan.scheduled.append((req, n))
            prefilling.append(seq)
        return budget

    def observe(self, plan: SchedulerPlan, seconds: float) -> None:
        """After the step: what it carried and how long it took, for the pacer."""
        if self.pacer is not None:
            prompt_tokens = sum(n for _, n in plan.scheduled if n > 1)
            decode_rows = sum(1 for _, n in plan.scheduled if n == 1)
            self.pacer.observe(seconds, prompt_tokens, decode_rows, plan.long_tokens)

    def _grow(self, req: Scheduled, tokens: int, running: list, waiting: deque, plan: SchedulerPlan) -> bool:
        """Blocks for ``tokens`` tokens of ``req``, preempting the newest requests if needed;
        False if ``req`` itself had to go."""
        seq = req.seq
        need = self.kv.blocks_for(tokens) - len(seq.block_table)
        while need > 0 and not self.kv.can_allocate(need):
            lowest = max(r.priority for r in running)
            victim = next(r for r in reversed(running) if r.priority == lowest)
            self.preempt(victim, running, waiting)
            plan.preempted.append(victim)
            # A lower-priority victim may be older than ``req`` and already planned.
            plan.scheduled = [(r, n) for r, n in plan.scheduled if r is not victim]
            if victim is req:
                return False
        if need > 0:
            self.kv.grow(seq, need)
        return True

    def preempt(self, req: Scheduled, running: list, waiting: deque) -> None:
        """Recompute later: its blocks go back (still findable), it goes to the front of its
        priority's place in the queue."""
        running.remove(req)
        self.kv.free(req.seq)
        enqueue(waiting, req, front=True)
        self.preemptions += 1
