"""Short requests start beside a long prefill, and the long prompt still finishes.

The scheduler and the pacer together, on a synthetic clock (a step costs a fixed part plus a
part per prompt token and per decoding row), with the real KV cache manager over a tiny pool:
the policy, without a model.
"""

from __future__ import annotations

from collections import deque

import torch

from glm_api.engines.kv_cache_manager import KVCacheManager
from glm_api.engines.kv_pool import KVPool, KVShape
from glm_api.engines.pacing import PrefillPacer
from glm_api.engines.scheduler import Scheduler, enqueue
from glm_api.engines.sequence import Sequence

CHUNK = 256
SHARE = 0.15


class _Req:
    def __init__(self, name: str, prompt: int, out: int, first_id: int) -> None:
        self.name, self.out = name, out
        self.seq = Sequence(list(range(first_id, first_id + prompt)))  # distinct: no prefix sharing
        self.prompt = prompt
        self.first_token_step: int | None = None
        self.done_step: int | None = None
        self.priority = 0


class _Sim:
    """The engine's loop around the scheduler, with a step's time made up from what it carries."""

    def __init__(self, time_share: float = SHARE) -> None:
        shape = KVShape(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32)
        self.kv = KVCacheManager(KVPool(shape, 4096, 16, torch.device("cpu")))
        self.pacer = PrefillPacer(CHUNK, time_share, step_seconds=0.5)
        self.scheduler = Scheduler(self.kv, max_running=64, chunk_tokens=CHUNK, pacer=self.pacer)
        self.running: list[_Req] = []
        self.waiting: deque[_Req] = deque()
        self.clock = 0.0
        self.long_seconds = 0.0  # engine time spent on long prompts' tokens
        self.step_no = 0
        self.plans = []

    def step(self) -> None:
        plan = self.scheduler.schedule(self.running, self.waiting)
        self.plans.append(plan)
        prompt = sum(n for _, n in plan.scheduled if n > 1)
        decode = sum(1 for _, n in plan.scheduled if n == 1)
        seconds = 0.02 + 0.002 * prompt + 0.0005 * decode
        self.clock += seconds
        self.long_seconds += 0.002 * plan.long_tokens
        self.kv.apply(self.kv.take_block_ops())
        self.kv.computed([(r.seq, n) for r, n in plan.scheduled])
        for req, n in plan.scheduled:
            if req.seq.num_computed_tokens < len(req.seq.token_ids):
                continue  # mid-prompt
            if req.first_token_step is None:
                req.first_token_step = self.step_no
            if len(req.seq.token_ids) - req.prompt >= req.out:
                req.done_step = self.step_no
                self.running.remove(req)
                self.kv.free(req.seq)
            else:
                req.seq.token_ids.append(7)
        self.scheduler.observe(plan, seconds)
        self.step_no += 1


def test_a_short_request_starts_in_the_next_step_beside_a_long_prefill():
    sim = _Sim()
    long = _Req("long", 6000, 4, first_id=1_000_000)
    sim.waiting.append(long)
    for _ in range(3):
        sim.step()
    assert long.seq.num_computed_tokens > 0 and long.first_token_step is None  # prefilling
    short = _Req("short", 40, 8, first_id=2_000_000)
    sim.waiting.append(short)
    arrived = sim.step_no
    sim.step()
    assert short in sim.plans[-1].admitted  # not after the long prompt's remaining ~5000 tokens
    assert short.first_token_step == arrived
    while long.done_step is None:
        sim.step()
    assert short.done_step is not None and short.done_step < long.first_token_step


def test_shorts_never_take_the_budget_the_pacer_grants_a_long_prompt():
    """Short prompts waiting and nothing decoding: the long prompt's paced chunk is kept for it,
    and the shorts fill the rest of the step."""
    sim = _Sim()
    long = _Req("long", 6000, 4, first_id=1_000_000)
    sim.waiting.append(long)
    sim.step()
    for _ in range(200):  # decode-free for long enough that its share is below time_share
        sim.pacer.observe(0.1, 0, 0)
    shorts = [_Req(f"s{i}", 100, 1, first_id=3_000_000 + i * 1000) for i in range(8)]
    sim.waiting.extend(shorts)
    sim.step()
    carried = dict((r.name, n) for r, n in sim.plans[-1].scheduled)
    assert carried.get("long", 0) > 0
    assert sum(carried.values()) <= CHUNK
    assert sum(n for name, n in carried.items() if name != "long") > 0


def test_a_steady_stream_of_short_requests_cannot_starve_a_long_prompt():
    """The documented bound: whatever keeps arriving, a long prompt gets about ``time_share`` of
    the engine's time, so its first token comes within about its time alone / time_share."""
    alone = _Sim()
    long_alone = _Req("long", 4000, 1, first_id=1_000_000)
    alone.waiting.append(long_alone)
    while long_alone.first_token_step is None:
        alone.step()
    alone_seconds = alone.clock

    sim = _Sim()
    long = _Req("long", 4000, 1, first_id=1_000_000)
    sim.waiting.append(long)
    n = 0
    while long.first_token_step is None:
        if sim.step_no % 2 == 0:  # a new short request every other step, each decoding 30 tokens
            sim.waiting.append(_Req(f"s{n}", 48, 30, first_id=5_000_000 + n * 100))
            n += 1
        sim.step()
        assert sim.clock < 20 * alone_seconds, "the long prompt is starved"
    assert n > 50 and len(sim.running) > 5  # the shorts really competed all along
    assert sim.clock <= alone_seconds / SHARE * 1.3
    assert sim.long_seconds / sim.clock >= SHARE * 0.7


def test_interactive_requests_queue_ahead_of_batch_lines_and_a_preempted_row_keeps_its_place():
    batch = [_Req(f"batch{i}", 40, 8, first_id=3_000_000 + 100 * i) for i in range(2)]
    for req in batch:
        req.priority = 1
    waiting: deque = deque()
    for req in batch:
        enqueue(waiting, req)
    late = _Req("interactive", 40, 8, first_id=4_000_000)
    enqueue(waiting, late)
    assert [r.name for r in waiting] == ["interactive", "batch0", "batch1"]
    preempted = _Req("batch-preempted", 40, 8, first_id=5_000_000)
    preempted.priority = 1
    enqueue(waiting, preempted, front=True)  # back to the front of the batch lines, behind interactive
    assert [r.name for r in waiting] == ["interactive", "batch-preempted", "batch0", "batch1"]
    first = _Req("interactive-preempted", 40, 8, first_id=6_000_000)
    enqueue(waiting, first, front=True)
    assert waiting[0] is first
