"""Two CPU replicas behind one real server (``--device cpu,cpu``), read over HTTP.

16 concurrent streams spread over both replicas and each answer equals what one engine alone
answers (greedy); a client that disconnects frees the slot on the replica that ran it, not on
the other; ``/health`` lists both replicas.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from glm_api.engines.base import SamplingParams
from glm_api.engines.chat_engine import TransformersChatEngine
from tests.api.test_metrics import value
from tests.e2e.conftest import NO_KERNEL_TIMING, start_server, stop_server
from tests.engines.test_chat_batching import collect

pytestmark = pytest.mark.e2e

MAX_TOKENS = 10
SUBJECTS = ["tea", "rain", "maps", "owls", "bread", "glass", "snow", "kites",
            "salt", "bees", "clocks", "ferns", "rivers", "chess", "bells", "moss"]


def conversation(i: int) -> list[dict]:
    detail = " Give one surprising fact." * (i % 3)
    return [{"role": "user", "content": f"Tell me about {SUBJECTS[i]}.{detail}"}]


@pytest.fixture(scope="module")
def replica_server(smollm2_cache_dir, tmp_path_factory):
    server = start_server(
        ["--cache-dir", str(smollm2_cache_dir), "--device", "cpu,cpu", "--log-level", "info", *NO_KERNEL_TIMING],
        tmp_path_factory.mktemp("replicas") / "server.log",
    )
    yield server
    stop_server(server)


def metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def stream_text(client: httpx.AsyncClient, url: str, messages: list[dict]) -> tuple[str, str | None]:
    body = {"model": "SmolLM2-135M-Instruct", "messages": messages, "stream": True, "temperature": 0, "max_tokens": MAX_TOKENS}
    text, finish = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            for choice in json.loads(line[5:])["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    return "".join(text), finish


def test_sixteen_streams_spread_over_both_replicas_and_answer_as_one_engine(replica_server, smollm2):
    url = replica_server.url
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert [(r["replica"], r["device"], r["state"]) for r in health["replicas"]] == [(0, "cpu", "ok"), (1, "cpu", "ok")]
    before = metrics(url)

    async def served():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*[stream_text(client, url, conversation(i)) for i in range(16)])

    answers = asyncio.run(served())
    after = metrics(url)

    engine = TransformersChatEngine(smollm2, "reference", max_running=16)
    engine.start()
    try:
        prompts = [smollm2.template.encode_messages(conversation(i)) for i in range(16)]
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)

        async def reference():
            return await asyncio.gather(*[collect(engine, p, params, f"ref-{i}") for i, p in enumerate(prompts)])

        expected = asyncio.run(reference())
    finally:
        engine.stop()
    assert [a for a in answers] == [(e.text, e.finish_reason) for e in expected]

    finished = {
        r: value(after, "glm_api_chat_requests_finished_total", replica=r) - value(before, "glm_api_chat_requests_finished_total", replica=r)
        for r in ("0", "1")
    }
    assert sum(finished.values()) == 16
    assert min(finished.values()) >= 4, finished  # both replicas worked


def test_a_disconnect_frees_the_slot_on_its_own_replica(replica_server):
    url = replica_server.url
    body = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}], "stream": True,
            "chunk": True, "temperature": 0, "max_tokens": 400}

    def running() -> dict[str, float]:
        now = metrics(url)
        return {r: value(now, "glm_api_chat_running_sequences", replica=r) for r in ("0", "1")}

    async def first_token(lines) -> None:
        """Read up to the first token; ``lines`` must stay referenced: an iterator that is
        collected closes its response, which is a disconnect."""
        async for line in lines:
            if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                return  # running: its first token came

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client, client.stream("POST", f"{url}/chat", json=body) as kept:
            kept_lines = kept.aiter_lines()
            await first_token(kept_lines)
            kept_on = [r for r, n in running().items() if n == 1]
            aborts_before = metrics(url)
            async with client.stream("POST", f"{url}/chat", json=body) as dropped:
                dropped_lines = dropped.aiter_lines()
                await first_token(dropped_lines)
                both = running()
            # The dropped connection is closed: its replica's slot comes free, the other's not.
            deadline = time.monotonic() + 30
            while True:
                now = running()
                if sum(now.values()) == 1 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            aborts_after = metrics(url)
            del kept_lines, dropped_lines
        return kept_on, both, now, aborts_before, aborts_after

    kept_on, both, now, aborts_before, aborts_after = asyncio.run(scenario())
    assert len(kept_on) == 1
    kept, other = kept_on[0], "1" if kept_on[0] == "0" else "0"
    assert both == {"0": 1, "1": 1}  # the second stream went to the idle replica
    assert now == {kept: 1, other: 0}

    def aborts(samples, replica):
        return value(samples, "glm_api_chat_requests_finished_total", replica=replica, reason="abort")

    assert aborts(aborts_after, other) - aborts(aborts_before, other) == 1
    assert aborts(aborts_after, kept) == aborts(aborts_before, kept)
