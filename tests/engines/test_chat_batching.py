"""Continuous batching in the chat engine, on the packaged SmolLM2 (real model, no mocks).

What batching must not change: a greedy request gives the same tokens alone and inside a batch
of different-length requests that join and leave around it; a seeded sampled request is
reproducible in a batch; each row keeps its own stop strings and max_tokens. What it must do:
a cancelled stream frees its slot within a step, and a full queue answers 429 at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import pytest
import torch

from glm_api.engines.base import SamplingParams
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.errors import InternalError, RateLimitError
from tests.conftest import make_registry, make_settings

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
QUESTIONS = [
    "Hi!",
    "What is the capital of France? Answer in one sentence.",
    "Name three colours of the rainbow, then explain in detail how a rainbow forms in the sky after rain.",
]


@dataclass
class Output:
    ids: list[int]
    text: str
    finish_reason: str | None
    chunks: int


async def collect(engine: TransformersChatEngine, prompt: list[int], params: SamplingParams, request_id: str) -> Output:
    ids: list[int] = []
    text: list[str] = []
    reason, chunks = None, 0
    async for chunk in engine.generate(prompt, params, request_id):
        ids += chunk.token_ids
        text.append(chunk.text)
        reason = chunk.finish_reason
        chunks += 1
    return Output(ids, "".join(text), reason, chunks)


@pytest.fixture(scope="module")
def prompts(smollm2) -> list[list[int]]:
    return [smollm2.template.encode_messages([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = TransformersChatEngine(smollm2, "smollm2", max_running=8, max_waiting=4)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def small_engine(smollm2):
    """One running slot and one waiting place: saturated by two requests."""
    engine = TransformersChatEngine(smollm2, "smollm2", max_running=1, max_waiting=1)
    engine.start()
    yield engine
    engine.stop()


def test_greedy_alone_equals_greedy_in_a_batch(engine, prompts):
    async def scenario():
        alone = [await collect(engine, p, GREEDY, f"alone-{i}") for i, p in enumerate(prompts)]

        async def late(i: int, delay_steps: int) -> Output:
            start = engine.stats.steps
            while engine.stats.steps < start + delay_steps:  # join a batch already decoding
                await asyncio.sleep(0.005)
            return await collect(engine, prompts[i], GREEDY, f"late-{i}")

        long_params = SamplingParams(max_tokens=24, temperature=0.0)  # outlives the others
        batched = await asyncio.gather(
            collect(engine, prompts[0], long_params, "b-0"),
            collect(engine, prompts[1], GREEDY, "b-1"),
            late(2, 3),
            collect(engine, prompts[2], SamplingParams(max_tokens=4, temperature=0.0), "b-short"),  # leaves early
        )
        return alone, batched

    alone, batched = asyncio.run(scenario())
    assert batched[0].ids[: len(alone[0].ids)] == alone[0].ids
    assert batched[1].ids == alone[1].ids
    assert batched[2].ids == alone[2].ids
    assert batched[3].ids == alone[2].ids[:4] and batched[3].finish_reason == "length"
    assert [o.text for o in batched[1:3]] == [o.text for o in alone[1:]]


def test_seeded_sampling_is_reproducible_in_a_batch(engine, prompts):
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234)

    async def scenario():
        alone = await collect(engine, prompts[1], sampled, "s-alone")
        batched, *_ = await asyncio.gather(
            collect(engine, prompts[1], sampled, "s-batched"),
            collect(engine, prompts[0], SamplingParams(max_tokens=12, temperature=1.0, seed=5), "s-other"),
            collect(engine, prompts[2], GREEDY, "s-greedy"),
        )
        other_seed = await collect(engine, prompts[1], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=99), "s-99")
        return alone, batched, other_seed

    alone, batched, other_seed = asyncio.run(scenario())
    assert batched.ids == alone.ids
    assert other_seed.ids != alone.ids  # the seed is what made them equal


def test_each_row_keeps_its_own_stop_and_max_tokens(engine, prompts):
    async def scenario():
        reference = await collect(engine, prompts[1], SamplingParams(max_tokens=12, temperature=0.0), "ref")
        words = reference.text.split()
        stop_word = words[2] if len(words) > 2 else words[-1]
        outs = await asyncio.gather(
            collect(engine, prompts[1], SamplingParams(max_tokens=12, temperature=0.0, stop=(stop_word,)), "r-stop"),
            collect(engine, prompts[1], SamplingParams(max_tokens=3, temperature=0.0), "r-three"),
            collect(engine, prompts[1], SamplingParams(max_tokens=12, temperature=0.0), "r-full"),
        )
        return reference, stop_word, outs

    reference, stop_word, (stopped, three, full) = asyncio.run(scenario())
    assert stopped.finish_reason == "stop"
    assert stop_word not in stopped.text and reference.text.startswith(stopped.text)
    assert three.finish_reason == "length" and len(three.ids) == 3
    assert full.ids == reference.ids


def test_a_cancelled_stream_frees_its_slot_within_a_step(small_engine, prompts):
    async def scenario():
        first = small_engine.generate(prompts[0], SamplingParams(max_tokens=500, temperature=0.0), "long")
        await first.__anext__()  # running, holding the only slot
        waiting = asyncio.ensure_future(collect(small_engine, prompts[1], SamplingParams(max_tokens=2, temperature=0.0), "next"))
        await asyncio.sleep(0.05)
        assert small_engine.num_running == 1 and small_engine.num_waiting == 1
        steps_at_cancel = small_engine.stats.steps
        cancelled_at = time.monotonic()
        await first.aclose()  # what a client disconnect does to the stream
        out = await asyncio.wait_for(waiting, timeout=30)
        return out, small_engine.stats.steps - steps_at_cancel, time.monotonic() - cancelled_at

    out, steps, _ = asyncio.run(scenario())
    assert out.finish_reason == "length" and len(out.ids) == 2
    # The slot came free at the next turn: at most the step in flight, then the newcomer's two
    # (its prompt, which gives its first token, and one decode step for the second).
    assert steps <= 3
    assert small_engine.stats.finished["abort"] == 1


def test_a_full_queue_is_refused_at_once(small_engine, prompts):
    async def scenario():
        long = SamplingParams(max_tokens=500, temperature=0.0)
        running = small_engine.generate(prompts[0], long, "q-running")
        await running.__anext__()
        waiting = small_engine.generate(prompts[1], long, "q-waiting")
        started = time.monotonic()
        with pytest.raises(RateLimitError) as refused:
            small_engine.generate(prompts[2], long, "q-refused")
        elapsed = time.monotonic() - started
        await running.aclose()
        await waiting.aclose()
        return refused.value, elapsed

    error, elapsed = asyncio.run(scenario())
    assert elapsed < 0.5
    assert error.status_code == 429 and error.headers() == {"Retry-After": "1"}
    assert small_engine.stats.rejected == 1


class _FailsOnce:
    """The model, except that its first forward raises."""

    def __init__(self, model) -> None:
        self._model, self.failed = model, False

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected failure")
        return self._model(*args, **kwargs)


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(smollm2, prompts):
    engine = TransformersChatEngine(smollm2, "smollm2", max_running=4)
    engine.runner.model = _FailsOnce(smollm2.model)
    engine.start()
    try:
        async def scenario():
            with pytest.raises(InternalError):
                await asyncio.wait_for(collect(engine, prompts[0], GREEDY, "fails"), timeout=30)
            return await collect(engine, prompts[0], SamplingParams(max_tokens=2, temperature=0.0), "works")

        out = asyncio.run(scenario())
    finally:
        engine.stop()
    assert out.finish_reason == "length" and len(out.ids) == 2


def test_the_api_answers_429_with_retry_after_when_the_queue_is_full(smollm2, prompts):
    from fastapi.testclient import TestClient

    from glm_api.app import create_app

    settings = make_settings(max_running=1, max_waiting=0)
    registry = make_registry(smollm2, {}, settings)
    with TestClient(create_app(settings, registry)) as client:
        engine = registry.chat

        async def scenario():
            holder = engine.generate(prompts[0], SamplingParams(max_tokens=500, temperature=0.0), "holder")
            await holder.__anext__()
            try:
                return await asyncio.to_thread(
                    client.post, "/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                )
            finally:
                await holder.aclose()

        response = asyncio.run(scenario())
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "1"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.json()["error"]["type"] == "rate_limit_error"
