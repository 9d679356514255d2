"""A chat replica per device: the router over two real CPU engines (packaged SmolLM2, no mocks).

Where a request goes (least outstanding work in tokens, prefix affinity while loads are close),
admission per replica with a 429 only when every replica is full, a dead replica out of
rotation, a closed stream freeing its slot on its own replica, and /health and /metrics per
replica. The registry's ``--device cpu,cpu`` path (two loads, two pools) runs on a tiny model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import torch
from fastapi.testclient import TestClient

from glm_api.app import create_app
from glm_api.devices import resolve_devices
from glm_api.engines.base import SamplingParams
from glm_api.engines.base import Constraint
from glm_api.engines.replica_balancer import ReplicaBalancer
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.errors import EngineUnavailableError, RateLimitError
from glm_api.registry import ModelRegistry, ModelSource, ModelSources, build_registry
from tests.api.test_metrics import scrape, value
from tests.conftest import make_settings
from tests.engines.test_chat_batching import collect

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
HOLD = SamplingParams(max_tokens=500, temperature=0.0)  # outlives the test unless closed
SYSTEM = (
    "You are a careful assistant for a small bakery. You answer questions about opening hours, "
    "ingredients, allergens and prices. Keep answers short, friendly and accurate, and say when "
    "you do not know something instead of guessing."
)


def make_router(loaded, *, max_running: int = 4, max_waiting: int = 8, model=None) -> ReplicaBalancer:
    """Two replicas of the same weights (sharing the loaded tensors: this is about routing;
    the registry test below loads once per device). ``model`` replaces replica 1's model."""
    engines = [
        TransformersChatEngine(loaded, "smollm2", max_running=max_running, max_waiting=max_waiting)
        for _ in range(2)
    ]
    if model is not None:
        engines[1].runner.model = model
    return ReplicaBalancer(engines, ["cpu", "cpu"])


@pytest.fixture
def router(smollm2):
    router = make_router(smollm2)
    router.start()
    yield router
    router.stop()


def encode(loaded, *questions: str, answers: tuple[str, ...] = ()) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return loaded.template.encode_messages(messages)


async def started(stream):
    """Wait for a stream's first chunk (it is running) and return the stream."""
    await stream.__anext__()
    return stream


async def until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_device_lists():
    assert resolve_devices("cpu,cpu") == [torch.device("cpu")] * 2
    assert resolve_devices(" cpu ") == [torch.device("cpu")]
    for bad, message in [("", "names no device"), ("cpu,nope", "not one of"), ("cpu,all", "stands alone")]:
        with pytest.raises(ValueError, match=message):
            resolve_devices(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_devices("all")


def test_least_outstanding_work_counts_tokens_not_requests(router, smollm2):
    first, second = (r.engine for r in router.replicas)
    prompt = encode(smollm2, "When do you open on Sundays?")

    async def scenario():
        # Replica 0: one request that may still generate 400 tokens. Replica 1: two requests
        # of 30 tokens each. By request count replica 0 is the lighter; by work, replica 1.
        streams = [first.generate(prompt, SamplingParams(max_tokens=400, temperature=0.0), "big")]
        streams += [second.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0), f"small-{i}") for i in range(2)]
        loads = first.outstanding_tokens(), second.outstanding_tokens()
        routed = router.generate(prompt, GREEDY, "routed")
        where = router.replica_of("routed")
        out = [chunk async for chunk in routed]
        for request_id in ("big", "small-0", "small-1"):  # never iterated: closing them would not abort
            (first if request_id == "big" else second).abort(request_id)
        await until(lambda: first.num_running + first.num_waiting + second.num_running + second.num_waiting == 0)
        return loads, where, out

    (load_first, load_second), where, out = asyncio.run(scenario())
    assert load_first > 400 and load_second < 2 * (30 + len(prompt)) + 1
    assert where == 1
    assert out[-1].finish_reason == "length"
    assert router.replica_of("routed") is None  # forgotten once finished


def test_prefix_affinity_while_loads_are_close(router, smollm2):
    first, second = (r.engine for r in router.replicas)
    turn1 = encode(smollm2, "What is in the rye bread?")

    async def scenario():
        answer = await collect(second, turn1, GREEDY, "turn-1")  # replica 1 now holds turn 1
        turn2 = encode(smollm2, "What is in the rye bread?", "And is it vegan?", answers=(answer.text,))
        hits = first.cached_prefix_tokens(turn2), second.cached_prefix_tokens(turn2)
        assert turn2[: len(turn1)] == turn1
        # Both idle: the conversation follows its cached beginning (a tie would go to replica 0).
        routed = router.generate(turn2, GREEDY, "turn-2")
        near = router.replica_of("turn-2")
        assert [chunk async for chunk in routed][-1].finish_reason == "length"
        # Replica 1 busy with far more work than the cache saves: the prompt goes elsewhere.
        holder = await started(second.generate(turn1, HOLD, "holder"))
        routed = router.generate(turn2, GREEDY, "turn-2-busy")
        far = router.replica_of("turn-2-busy")
        router.abort("turn-2-busy")
        await holder.aclose()
        return hits, near, far

    (hit_first, hit_second), near, far = asyncio.run(scenario())
    assert hit_first == 0 and hit_second >= 3 * 16  # the system prompt and the first turn, in blocks
    assert near == 1
    assert far == 0


def test_admission_is_per_replica_and_429_only_when_all_are_full(smollm2):
    router = make_router(smollm2, max_running=1, max_waiting=0)
    router.start()
    prompt = encode(smollm2, "Do you sell gluten-free cakes?")
    try:
        async def scenario():
            a = await started(router.generate(prompt, HOLD, "a"))
            b = await started(router.generate(prompt, HOLD, "b"))
            placed = router.replica_of("a"), router.replica_of("b")
            with pytest.raises(RateLimitError) as refused:
                router.generate(prompt, GREEDY, "c")
            await a.aclose()  # its replica has room again
            freed = router.replicas[placed[0]].engine
            await until(lambda: not freed.queue_full)
            d = router.generate(prompt, GREEDY, "d")
            d_at = router.replica_of("d")
            out = [chunk async for chunk in d]
            await b.aclose()
            return placed, refused.value, d_at, out

        placed, error, d_at, out = asyncio.run(scenario())
    finally:
        router.stop()
    assert sorted(placed) == [0, 1]  # one on each: each replica admits max_running itself
    assert error.status_code == 429 and error.headers() == {"Retry-After": "1"}
    assert "all 2 chat replicas are full" in error.message
    assert router.rejected == 1 and [r.engine.stats.rejected for r in router.replicas] == [0, 0]
    assert d_at == placed[0] and out[-1].finish_reason == "length"


def test_a_closed_stream_frees_its_slot_on_its_own_replica(router, smollm2):
    prompt = encode(smollm2, "How much is a croissant?")

    async def scenario():
        a = await started(router.generate(prompt, HOLD, "a"))
        b = await started(router.generate(prompt, HOLD, "b"))
        where = {"a": router.replica_of("a"), "b": router.replica_of("b")}
        engines = {name: router.replicas[i].engine for name, i in where.items()}
        await b.aclose()  # a client that went away
        await until(lambda: engines["b"].num_running == 0)
        a_still = engines["a"].num_running
        router.abort("a")  # the serving layer's abort reaches the replica that runs it
        await until(lambda: engines["a"].num_running == 0)
        await a.aclose()
        return where, engines, a_still

    where, engines, a_still = asyncio.run(scenario())
    assert where["a"] != where["b"]
    assert a_still == 1
    assert engines["b"].stats.finished["abort"] == 1 and engines["a"].stats.finished["abort"] == 1


def test_a_constraint_compiled_once_serves_every_replica(router, smollm2):
    grammar = router.compile_constraint(Constraint("choice", json.dumps(["yes, we do", "no, sorry"])))
    params = SamplingParams(max_tokens=12, temperature=0.0, grammar=grammar)
    prompt = encode(smollm2, "Do you bake on Sundays?")

    async def scenario():
        streams = [router.generate(prompt, params, f"c-{i}") for i in range(2)]
        places = [router.replica_of(f"c-{i}") for i in range(2)]
        texts = []
        for stream in streams:
            texts.append("".join([chunk.text async for chunk in stream]))
        return places, texts

    places, texts = asyncio.run(scenario())
    assert sorted(places) == [0, 1]
    assert all(text in ("yes, we do", "no, sorry") for text in texts) and texts[0] == texts[1]


class _WorkerKilled(BaseException):
    """Not an ``Exception``: the engine's step guard does not catch it, so its thread dies."""


class _DiesOnFirstForward:
    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        raise _WorkerKilled("injected: the worker thread dies")


def test_a_dead_replica_leaves_the_rotation(smollm2, caplog):
    router = make_router(smollm2, model=_DiesOnFirstForward(smollm2.model))
    router.start()
    prompt = encode(smollm2, "Are you open on holidays?")
    try:
        async def scenario():
            with pytest.raises(EngineUnavailableError):  # the request in flight fails with it (503)
                await collect(router.replicas[1].engine, prompt, GREEDY, "on-the-dying-replica")
            with caplog.at_level(logging.ERROR, logger="glm_api.engines.replica_balancer"):
                router.check_health()  # one replica left: still healthy
            places = []
            for i in range(3):
                out = await collect(router, prompt, GREEDY, f"after-{i}")
                assert out.finish_reason == "length"
                places.append(router.replicas[0].engine.stats.finished["length"])
            return places

        places = asyncio.run(scenario())
        assert places == [1, 2, 3]  # every request went to the replica that lives
        assert router.replicas[1].down is not None and router.replicas[0].down is None
        assert any("replica 1 (cpu)" in r.message and "out of rotation" in r.message for r in caplog.records)
        router.replicas[0].engine.stop()
        with pytest.raises(EngineUnavailableError, match="no replica of chat model smollm2 can serve"):
            router.check_health()
    finally:
        router.stop()


def test_health_metrics_and_429_per_replica_over_http(smollm2):
    settings = make_settings(max_running=1, max_waiting=0)
    router = make_router(smollm2, max_running=1, max_waiting=0)
    registry = ModelRegistry(router, {})
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    with TestClient(create_app(settings, registry)) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok"
        assert [(r["replica"], r["device"], r["state"]) for r in health["replicas"]] == [(0, "cpu", "ok"), (1, "cpu", "ok")]
        before = scrape(client)
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        after = scrape(client)
        for i in ("0", "1"):
            assert value(after, "glm_api_chat_replica_up", model="smollm2", replica=i, device="cpu") == 1
            assert ("glm_api_chat_kv_blocks", (("model", "smollm2"), ("replica", i), ("state", "used"))) in after
        moved = [
            value(after, "glm_api_chat_generated_tokens_total", replica=i) - value(before, "glm_api_chat_generated_tokens_total", replica=i)
            for i in ("0", "1")
        ]
        assert sorted(moved) == [0, 3]  # one replica answered, and its series says so

        async def both_full():
            holders = [await started(router.generate([1, 2, 3], HOLD, f"holder-{i}")) for i in range(2)]
            try:
                return await asyncio.to_thread(client.post, "/v1/chat/completions", json=body)
            finally:
                for holder in holders:
                    await holder.aclose()

        refused = asyncio.run(both_full())
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert value(scrape(client), "glm_api_queue_rejections_total", engine="chat", model="smollm2") == 1
        # The holders' aborts take effect at each worker's next turn: wait for the slots.
        deadline = time.monotonic() + 30
        while any(r.engine.num_running or r.engine.num_waiting for r in router.replicas):
            assert time.monotonic() < deadline, "the aborted holders never left"
            time.sleep(0.01)

        router.replicas[1].engine.stop()
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["replicas"][1]["state"] == "down"
        assert client.get("/ready").status_code == 200
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert value(scrape(client), "glm_api_chat_replica_up", replica="1") == 0

        router.replicas[0].engine.stop()
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        assert client.post("/v1/chat/completions", json=body).status_code == 503


def test_registry_loads_the_chat_model_once_per_listed_device(tiny_llama_dir, tiny_bert_dir):
    settings = make_settings(device="cpu,cpu", max_running=2, kv_cache_tokens=1024)
    sources = ModelSources(ModelSource("tiny", tiny_llama_dir), (ModelSource("bert", tiny_bert_dir),))
    registry = build_registry(settings, sources)
    router = registry.chat
    assert isinstance(router, ReplicaBalancer) and router.devices == ["cpu", "cpu"]
    first, second = (r.engine for r in router.replicas)
    assert first.model is not second.model  # loaded twice
    assert first.runner.pool is not second.runner.pool and first.kv is not second.kv  # own KV and prefix cache
    assert first.max_running == second.max_running == 2  # the limits hold per replica
    assert registry.chat_engine("tiny") is router and router.context_length == first.context_length
    assert next(registry.embeddings["bert"].loaded.model.parameters()).device == torch.device("cpu")

    registry.start()
    try:
        prompt = router.template.encode_messages([{"role": "user", "content": "hello"}])
        alone = asyncio.run(collect(first, prompt, GREEDY, "alone"))
        # Both replicas busy at once answer as one engine does alone.
        outs = asyncio.run(_gather(router, prompt, 4))
        assert all(out.ids == alone.ids for out in outs)
        assert all(r.engine.stats.finished["length"] >= 1 for r in router.replicas)
    finally:
        registry.stop()


async def _gather(engine, prompt, n):
    return await asyncio.gather(*[collect(engine, prompt, GREEDY, f"g-{i}") for i in range(n)])


def test_an_adapter_request_follows_the_adapters_cached_blocks_not_the_bases(tiny_llama_dir, tmp_path_factory):
    """Replica 0 holds a prompt's blocks computed by the base model, replica 1 the same prompt's
    blocks computed under the adapter: an adapter request continuing that prompt can reuse only
    replica 1's (its chain starts from the adapter's root), so that is where it goes; a base
    request goes to replica 0."""
    from glm_api.engines.adapter_engine import AdapterEngine
    from glm_api.families.detect import load_chat_model
    from tests.fixtures.lora_adapters import LLAMA_TARGETS, make_lora

    cpu = torch.device("cpu")
    loads = [load_chat_model(tiny_llama_dir, cpu, torch.float32, tmp_path_factory.mktemp("cache")) for _ in range(2)]
    folder = tmp_path_factory.mktemp("sql")
    make_lora(loads[0].model, folder, LLAMA_TARGETS, r=4, alpha=16, seed=0)
    engines = [
        TransformersChatEngine(loaded, "tiny", kv_cache_tokens=2048, kv_block_size=4, prefix_cache_tokens=512)
        for loaded in loads
    ]
    for engine in engines:
        engine.load_adapter("sql", str(folder))
    router = ReplicaBalancer(engines, ["cpu", "cpu"])
    sql = AdapterEngine(router, "sql")
    turn1 = loads[0].template.encode_messages([{"role": "user", "content": "Write a query for the tallest tower."}])
    sql_params = SamplingParams(max_tokens=4, temperature=0.0, adapter="sql")
    router.start()
    try:
        async def scenario():
            await collect(engines[0], turn1, GREEDY, "base-on-0")  # the base's blocks on replica 0
            await collect(engines[1], turn1, sql_params, "sql-on-1")  # the adapter's on replica 1
            turn2 = turn1 + loads[0].template.encode_messages([{"role": "user", "content": "And the oldest?"}])[1:]
            routed = sql.generate(turn2, GREEDY, "sql-routed")
            adapter_went = router.replica_of("sql-routed")
            adapter_cached = [chunk async for chunk in routed][-1].cached_tokens
            routed = router.generate(turn2, GREEDY, "base-routed")
            base_went = router.replica_of("base-routed")
            base_cached = [chunk async for chunk in routed][-1].cached_tokens
            return adapter_went, adapter_cached, base_went, base_cached

        adapter_went, adapter_cached, base_went, base_cached = asyncio.run(scenario())
    finally:
        router.stop()
    blocks = (len(turn1) - 1) // 4 * 4  # whole blocks of turn 1 (at least), cached on its replica
    assert blocks >= 8
    assert (adapter_went, base_went) == (1, 0)
    assert adapter_cached >= blocks and base_cached >= blocks  # each found its own blocks
