"""Dynamic batching in the embedding engine, on the packaged all-MiniLM-L6-v2 (real model).

Concurrent requests share forward passes, each caller gets its own rows back in its order and
equal to what it would get alone; a full queue answers 429 at once; a cancelled request
leaves the others unharmed.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from glm_api.engines.embedding_engine import BatchingEmbeddingEngine, split_by_length
from glm_api.errors import BadRequestError, RateLimitError
from glm_api.families.embedding import _tokenizer_lock
from glm_api.registry import ModelRegistry
from glm_api.serving.embeddings import EmbeddingService
from tests.conftest import make_settings

TEXTS = [
    "Hi.",
    "The cat sat on the mat.",
    "A much longer sentence about the weather, which was rainy all week, and about the trains that ran late.",
    "Embeddings map text to vectors.",
    "Paris is the capital of France.",
    "short",
    "Dynamic batching gathers concurrent requests into one forward pass, sorted by length.",
    "Two words",
]


@pytest.fixture
def engine(minilm):
    engine = BatchingEmbeddingEngine(minilm, "minilm", batch_size=8, batch_wait_ms=20, max_queued_texts=16)
    engine.start()
    yield engine
    engine.stop()


def embed_alone(engine: BatchingEmbeddingEngine, texts: list[str]) -> np.ndarray:
    async def each():
        return [(await engine.embed([t])).vectors[0] for t in texts]

    return np.stack(asyncio.run(each()))


def test_concurrent_requests_share_batches_and_match_alone(engine):
    alone = embed_alone(engine, TEXTS)
    batches_before = engine.stats.batches

    async def concurrent():
        return await asyncio.gather(*[engine.embed([t]) for t in TEXTS])

    results = asyncio.run(concurrent())
    assert engine.stats.batches - batches_before < len(TEXTS)  # coalesced, not one pass each
    batched = np.stack([r.vectors[0] for r in results])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert [r.token_counts[0] for r in results] == [len(engine.tokenize([t])[0]) for t in TEXTS]


def test_one_request_gets_its_rows_back_in_order(engine):
    alone = embed_alone(engine, TEXTS)
    mixed = TEXTS[::-1] + TEXTS[:3]  # sorted by length inside the engine, unsorted on return

    async def run():
        return await engine.embed(mixed)

    result = asyncio.run(run())
    expected = np.concatenate([alone[::-1], alone[:3]])
    np.testing.assert_allclose(result.vectors, expected, atol=1e-5)


def test_a_full_queue_is_refused_at_once(engine, minilm):
    async def scenario():
        with _tokenizer_lock(minilm.model):  # the worker blocks inside its first batch
            first = asyncio.ensure_future(engine.embed(TEXTS))
            await asyncio.sleep(0.1)  # the worker took those 8 and waits for the lock
            second = asyncio.ensure_future(engine.embed(TEXTS * 2))  # fills the queue: 16 of 16
            await asyncio.sleep(0)
            with pytest.raises(RateLimitError) as refused:
                await engine.embed(["one more"])
        return refused.value, await first, await second

    error, first, second = asyncio.run(scenario())
    assert error.status_code == 429 and error.headers() == {"Retry-After": "1"}
    assert engine.stats.rejected == 1
    assert first.vectors.shape == (8, 384) and second.vectors.shape == (16, 384)


def test_a_cancelled_request_does_not_break_the_others(engine, minilm):
    alone = embed_alone(engine, TEXTS[:4])

    async def scenario():
        with _tokenizer_lock(minilm.model):
            blocker = asyncio.ensure_future(engine.embed(["blocks the worker"]))
            await asyncio.sleep(0.1)
            doomed = asyncio.ensure_future(engine.embed(TEXTS * 2))  # fills the queue: 16 of 16
            await asyncio.sleep(0)
            doomed.cancel()
            await asyncio.sleep(0)
            # Admitted: the cancelled request's texts left the queue with it.
            survivor = asyncio.ensure_future(engine.embed(TEXTS[:4]))
            await asyncio.sleep(0)
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return await survivor, await engine.embed(["still serving"])

    survivor, later = asyncio.run(scenario())
    np.testing.assert_allclose(survivor.vectors, alone, atol=1e-5)
    assert later.vectors.shape == (1, 384)


def test_total_tokens_per_request_is_a_400(engine):
    service = EmbeddingService(ModelRegistry(None, {"minilm": engine}), make_settings(max_embedding_tokens=20))

    async def run(texts: list[str]):
        return await service.embed(engine, texts, truncate=True)

    assert asyncio.run(run(["short one", "short two"])).vectors.shape == (2, 384)
    with pytest.raises(BadRequestError) as error:
        asyncio.run(run(TEXTS))
    assert error.value.status_code == 400 and error.value.param == "input"


def test_split_by_length_cuts_only_where_padding_costs_more_than_a_pass():
    assert split_by_length([40] * 32) == [(0, 32)]  # equal lengths: one pass
    assert split_by_length([10] * 16 + [800] * 16) == [(0, 16), (16, 32)]
    assert split_by_length([]) == []
    parts = split_by_length(sorted([40 + 3 * i for i in range(32)]))
    assert parts[0][0] == 0 and parts[-1][1] == 32
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # consecutive, nothing lost


@pytest.mark.parametrize("stage", ["prepare", "token_lengths", "forward"])
def test_a_failing_batch_fails_its_requests_and_the_engine_keeps_serving(engine, monkeypatch, stage):
    # Seen once under fuzzing: an exception outside the forward pass killed the worker thread,
    # and every later request got 503 until a restart.
    from glm_api.engines import embedding_engine
    from glm_api.errors import InternalError

    real = getattr(embedding_engine.family, stage)
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(embedding_engine.family, stage, fail_once)
    with pytest.raises(InternalError):
        asyncio.run(engine.embed(["first"]))
    engine.check_health()  # the worker thread is still alive
    assert asyncio.run(engine.embed(["second"])).vectors.shape == (1, 384)
