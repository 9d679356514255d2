"""Rerank engines on real models: scores equal sentence-transformers' own ``CrossEncoder.predict``
on the same folder (tiny cross-encoders the fixtures build), batched with other requests and
alone; cosine scoring over an embedding model equals the in-process cosine of its vectors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder

from glm_api.engines.embedding_engine import BatchingEmbeddingEngine
from glm_api.engines.rerank_engine import BatchingRerankEngine, CosineRerankEngine
from glm_api.errors import RateLimitError
from glm_api.families.cross_encoder import detect_cross_encoder, load_cross_encoder

CPU = torch.device("cpu")
QUERY = "the weather today"
DOCUMENTS = [
    "the weather is nice today",
    "a cat sat on the mat",
    "今天天气很好",
    "i like apples",
    "the car drives fast , the dog sat on the mat and the cat is nice , hello world !",
    "hello",
    "北京 上海 天气",
]


def _reference(folder) -> CrossEncoder:
    return CrossEncoder(str(folder), device="cpu", local_files_only=True, trust_remote_code=False)


def _engine(folder, **kw) -> BatchingRerankEngine:
    engine = BatchingRerankEngine(load_cross_encoder(folder, CPU, torch.float32), "tiny", **kw)
    engine.start()
    return engine


@pytest.mark.parametrize("fixture", ["tiny_reranker_dir", "tiny_xlmr_reranker_dir", "tiny_identity_reranker_dir"])
def test_scores_equal_cross_encoder_predict_batched_and_alone(request, fixture):
    folder = request.getfixturevalue(fixture)
    pairs = [(QUERY, d) for d in DOCUMENTS]
    expected = _reference(folder).predict(pairs, batch_size=32)
    engine = _engine(folder, batch_size=4, batch_wait_ms=20)
    try:

        async def together():  # several requests in flight share passes (batch size 4 < 7 pairs)
            return await asyncio.gather(engine.score(pairs), engine.score(pairs[:3]), engine.score(pairs[3:]))

        whole, head, tail = asyncio.run(together())
        alone = [asyncio.run(engine.score([pair])).scores[0] for pair in pairs]
    finally:
        engine.stop()
    assert np.abs(whole.scores - expected).max() < 1e-5
    assert np.abs(np.concatenate([head.scores, tail.scores]) - expected).max() < 1e-5
    assert np.abs(np.array(alone) - expected).max() < 1e-5
    assert len(set(np.round(expected, 6))) > 1  # the scores differ, so the order is tested too
    assert whole.total_tokens == sum(len(ids) for ids in _reference(folder).tokenizer(
        [q for q, _ in pairs], [d for _, d in pairs])["input_ids"])


def test_the_activation_follows_the_folder(tiny_reranker_dir, tiny_identity_reranker_dir):
    sigmoid = load_cross_encoder(tiny_reranker_dir, CPU, torch.float32)
    identity = load_cross_encoder(tiny_identity_reranker_dir, CPU, torch.float32)
    assert isinstance(sigmoid.model.activation_fn, torch.nn.Sigmoid)
    assert isinstance(identity.model.activation_fn, torch.nn.Identity)
    engine = _engine(tiny_identity_reranker_dir)
    try:
        scores = asyncio.run(engine.score([(QUERY, d) for d in DOCUMENTS])).scores
    finally:
        engine.stop()
    assert (scores < 0).any() or (scores > 1).any()  # raw logits, not squashed into (0, 1)


def test_over_long_pairs_are_truncated_as_predict_does(tiny_reranker_dir):
    long_doc = " ".join(["the cat sat on the mat"] * 30)  # ~180 tokens, the model takes 64
    engine = _engine(tiny_reranker_dir)
    try:
        counts = engine.count_tokens([(QUERY, long_doc)])
        result = asyncio.run(engine.score([(QUERY, long_doc)]))
    finally:
        engine.stop()
    assert counts[0] > engine.max_seq_length == 64
    assert result.total_tokens == 64
    assert abs(result.scores[0] - _reference(tiny_reranker_dir).predict([(QUERY, long_doc)])[0]) < 1e-5


def test_folders_that_are_not_rerankers_are_refused(tiny_bert_dir, tmp_path):
    with pytest.raises(ValueError, match="not a sequence-classification"):
        detect_cross_encoder(tiny_bert_dir)
    with pytest.raises(ValueError, match="does not exist"):
        detect_cross_encoder(tmp_path / "missing")


def test_a_full_queue_is_refused_at_once(tiny_reranker_dir):
    engine = _engine(tiny_reranker_dir, max_queued_pairs=4)
    try:
        with pytest.raises(RateLimitError):
            asyncio.run(engine.score([(QUERY, d) for d in DOCUMENTS]))
        assert engine.stats.rejected == 1
    finally:
        engine.stop()


def test_cosine_scores_equal_the_in_process_cosine(minilm):
    embeddings = BatchingEmbeddingEngine(minilm, "minilm")
    embeddings.start()
    try:
        cosine = CosineRerankEngine(embeddings)
        documents = ["A man eats pasta.", "A plane takes off.", "A man is eating food."]
        pairs = [("A man is eating food.", d) for d in documents]
        pairs.append(("Two dogs play.", "A plane takes off."))  # pairwise, not only one query
        result = asyncio.run(cosine.score(pairs))
    finally:
        embeddings.stop()
    from sentence_transformers.util import cos_sim

    expected = [float(cos_sim(minilm.model.encode(a), minilm.model.encode(b))) for a, b in pairs]
    assert np.abs(result.scores - np.array(expected)).max() < 1e-5
    assert abs(result.scores[2] - 1.0) < 1e-5


def test_rerank_models_from_flags_environment_and_the_model_folder(
    tiny_reranker_dir, tiny_bert_dir, tmp_path, monkeypatch
):
    import shutil

    from glm_api.cli import settings_from_args
    from glm_api.config import Settings
    from glm_api.registry import StartupError, resolve_model_sources

    flags = settings_from_args(["--disable-chat", "--rerank-model", f"a={tiny_reranker_dir}", "--rerank-model", "b=/x"])
    assert flags.rerank_models == {"a": str(tiny_reranker_dir), "b": "/x"}
    monkeypatch.setenv("GLM_API_RERANK_MODELS", f"a={tiny_reranker_dir},b=/y")
    assert Settings(_env_file=None).rerank_models == {"a": str(tiny_reranker_dir), "b": "/y"}
    monkeypatch.delenv("GLM_API_RERANK_MODELS")

    # Nothing configured: a ./model/bge-reranker-* folder is found, as text2vec folders are.
    shutil.copytree(tiny_reranker_dir, tmp_path / "bge-reranker-base")
    found = resolve_model_sources(Settings(_env_file=None, disable_chat=True, model_dir=tmp_path))
    assert [(s.name, s.path) for s in found.rerankers] == [("bge-reranker-base", tmp_path / "bge-reranker-base")]
    nothing = Settings(_env_file=None, disable_chat=True, model_dir=tmp_path / "none")
    assert resolve_model_sources(nothing).rerankers == ()

    with pytest.raises(StartupError, match="rerank model 'enc'.*not a sequence-classification"):
        encoder = {"enc": str(tiny_bert_dir)}
        resolve_model_sources(Settings(_env_file=None, disable_chat=True, rerank_models=encoder))
    with pytest.raises(StartupError, match="does not exist"):
        missing = {"x": str(tmp_path / "missing")}
        resolve_model_sources(Settings(_env_file=None, disable_chat=True, rerank_models=missing))
