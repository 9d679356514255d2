"""ChatService over a real engine: limits that must be 400s, and runs that are dropped unread."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from glm_api.errors import BadRequestError
from glm_api.serving.chat import ChatCall, ChatService
from tests.conftest import make_registry, make_settings

QUESTION = [{"role": "user", "content": "Tell me a long story about the sea."}]


def with_service(smollm2, scenario, **overrides):
    async def main():
        settings = make_settings(**overrides)
        registry = make_registry(smollm2, {}, settings)
        registry.start()
        try:
            return await scenario(ChatService(registry, settings), registry.chat)
        finally:
            registry.stop()

    return asyncio.run(main())


def test_a_run_dropped_before_anyone_reads_it_frees_its_slots(smollm2):
    async def scenario(service, engine):
        # Seeded: a reproducible long story, so the two choices are still running when dropped.
        call = ChatCall(messages=QUESTION, max_tokens=500, n=2, temperature=0.8, seed=7)
        run = await service.start(call, "dropped")
        deadline = time.monotonic() + 5
        while engine.num_running < 2 and time.monotonic() < deadline:  # both prefilled, decoding
            await asyncio.sleep(0.05)
        busy = engine.num_running + engine.num_waiting
        del run  # e.g. the client left before the response started streaming
        gc.collect()
        deadline = time.monotonic() + 10
        while engine.num_running + engine.num_waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return busy, engine.num_running + engine.num_waiting

    busy, after = with_service(smollm2, scenario)
    assert busy == 2
    assert after == 0


def test_n_beyond_the_servers_capacity_is_400_not_429(smollm2):
    async def scenario(service, engine):
        with pytest.raises(BadRequestError, match="n is 4"):
            await service.start(ChatCall(messages=QUESTION, max_tokens=2, n=4), "too-many")

    with_service(smollm2, scenario, max_running=2, max_waiting=1)


def test_max_tokens_over_the_configured_limit_is_400(smollm2):
    async def scenario(service, engine):
        with pytest.raises(BadRequestError, match="at most 16"):
            await service.start(ChatCall(messages=QUESTION, max_tokens=17), "over")
        run = await service.start(ChatCall(messages=QUESTION, temperature=0), "default-capped")
        (choice,) = await run.collect()
        return choice

    choice = with_service(smollm2, scenario, max_tokens_limit=16)
    assert choice.completion_tokens <= 16
