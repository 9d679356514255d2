"""/rerank, /v1/rerank, /v2/rerank, /score and /v1/score through the app: shapes, ordering,
the cosine fallback over an embedding model, a cross-encoder's scores, errors as 4xx JSON."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sentence_transformers import CrossEncoder
from sentence_transformers.util import cos_sim

from glm_api.app import create_app
from glm_api.engines.rerank_engine import BatchingRerankEngine
from glm_api.families.cross_encoder import load_cross_encoder
from glm_api.registry import PACKAGED_EMBEDDING_NAME
from tests.conftest import make_registry, make_settings

QUERY = "A man is eating food."
DOCUMENTS = ["A plane is taking off.", "A man is eating a piece of bread.", "A man is riding a horse.", "A man eats."]


@pytest.fixture(scope="module")
def cosine_client(minilm):
    """The out-of-the-box shape: embeddings only, no cross-encoder."""
    settings = make_settings(disable_chat=True)
    with TestClient(create_app(settings, make_registry(None, {PACKAGED_EMBEDDING_NAME: minilm}, settings))) as client:
        yield client


@pytest.fixture(scope="module")
def reranker_client(minilm, tiny_reranker_dir):
    settings = make_settings(disable_chat=True)
    registry = make_registry(None, {PACKAGED_EMBEDDING_NAME: minilm}, settings)
    registry.rerankers["tiny-reranker"] = BatchingRerankEngine(
        load_cross_encoder(tiny_reranker_dir, torch.device("cpu"), torch.float32), "tiny-reranker"
    )
    with TestClient(create_app(settings, registry)) as client:
        yield client


def _cosines(minilm, query, documents):
    return [float(cos_sim(minilm.model.encode(query), minilm.model.encode(d))) for d in documents]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_without_a_cross_encoder_ranks_by_cosine(cosine_client, minilm, path):
    documents = [DOCUMENTS[0], {"text": DOCUMENTS[1]}, DOCUMENTS[2], {"text": DOCUMENTS[3]}]
    r = cosine_client.post(path, json={"query": QUERY, "documents": documents})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _cosines(minilm, QUERY, DOCUMENTS)
    assert body["model"] == PACKAGED_EMBEDDING_NAME
    assert [x["index"] for x in body["results"]] == list(np.argsort(expected)[::-1])
    for x in body["results"]:
        assert abs(x["relevance_score"] - expected[x["index"]]) < 1e-5
        assert x["document"] == {"text": DOCUMENTS[x["index"]]}
    assert body["usage"]["total_tokens"] > 0 and body["id"].startswith("rerank-")


def test_top_n_and_return_documents(cosine_client):
    body = {"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": False}
    r = cosine_client.post("/v1/rerank", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [3, 1] and all(x["document"] is None for x in results)
    many = cosine_client.post("/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 10}).json()
    assert len(many["results"]) == 4


def test_v2_rerank_has_cohere_v2_shape(cosine_client):
    from cohere.v2.types import V2RerankResponse

    body = {"model": PACKAGED_EMBEDDING_NAME, "query": QUERY, "documents": DOCUMENTS, "top_n": 3}
    r = cosine_client.post("/v2/rerank", json=body)
    assert r.status_code == 200, r.text
    body = r.json()
    parsed = V2RerankResponse.model_validate(body)
    assert [x.index for x in parsed.results] == [3, 1, 2]  # "A man eats." is closest
    assert "document" not in body["results"][0]
    assert parsed.meta.tokens.input_tokens > 0


def test_score_one_to_many_and_pairwise(cosine_client, minilm):
    one = cosine_client.post("/v1/score", json={"text_1": QUERY, "text_2": DOCUMENTS})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    expected = _cosines(minilm, QUERY, DOCUMENTS)
    assert np.abs(np.array([d["score"] for d in body["data"]]) - expected).max() < 1e-5
    pairs = {"text_1": [QUERY, DOCUMENTS[0]], "text_2": [DOCUMENTS[1], DOCUMENTS[0]]}
    pairwise = cosine_client.post("/score", json=pairs)
    assert pairwise.status_code == 200, pairwise.text
    scores = [d["score"] for d in pairwise.json()["data"]]
    assert abs(scores[0] - expected[1]) < 1e-5 and abs(scores[1] - 1.0) < 1e-5


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/rerank", {"query": QUERY, "documents": []}, None),
        ("/v1/rerank", {"query": QUERY, "documents": [{"title": "no text"}]}, None),
        ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 0}, None),
        ("/v1/rerank", {"documents": DOCUMENTS}, None),
        ("/v2/rerank", {"query": QUERY, "documents": [{"text": "v2 takes strings"}]}, None),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, None),
        ("/v1/score", {"text_1": [], "text_2": ["c"]}, None),
    ],
)
def test_invalid_requests_are_400_json(cosine_client, path, body, param):
    r = cosine_client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_404(cosine_client):
    r = cosine_client.post("/v1/rerank", json={"model": "nope", "query": QUERY, "documents": DOCUMENTS})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_over_long_inputs_follow_the_embedding_rule(cosine_client):
    long_doc = "word " * 400  # over all-MiniLM-L6-v2's 256 tokens
    r = cosine_client.post("/v1/rerank", json={"query": QUERY, "documents": [DOCUMENTS[0], long_doc]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "documents[1]"
    truncated = {"query": QUERY, "documents": [DOCUMENTS[0], long_doc], "truncate": True}
    ok = cosine_client.post("/v1/rerank", json=truncated)
    assert ok.status_code == 200, ok.text
    score = cosine_client.post("/v1/score", json={"text_1": QUERY, "text_2": [long_doc]})
    assert score.status_code == 400 and score.json()["error"]["param"] == "text_2[0]"
    v2 = cosine_client.post("/v2/rerank", json={"query": QUERY, "documents": [long_doc]})  # Cohere truncates
    assert v2.status_code == 200, v2.text


def test_a_cross_encoder_serves_rerank_with_predicts_scores(reranker_client, tiny_reranker_dir):
    documents = ["the weather is nice today", "a cat sat on the mat", "今天天气很好", "hello world"]
    query = "the weather today"
    reference = CrossEncoder(str(tiny_reranker_dir), device="cpu", local_files_only=True)
    expected = reference.predict([(query, d) for d in documents])
    r = reranker_client.post("/v1/rerank", json={"query": query, "documents": documents})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-reranker"  # the cross-encoder is the default once loaded
    assert [x["index"] for x in body["results"]] == list(np.argsort(-expected, kind="stable"))
    for x in body["results"]:
        assert abs(x["relevance_score"] - expected[x["index"]]) < 1e-5
    body = {"model": "tiny-reranker", "text_1": query, "text_2": documents}
    score = reranker_client.post("/v1/score", json=body).json()
    assert np.abs(np.array([d["score"] for d in score["data"]]) - expected).max() < 1e-5
    # An embedding model's name still scores by its cosine.
    body = {"model": PACKAGED_EMBEDDING_NAME, "query": query, "documents": documents}
    by_name = reranker_client.post("/v1/rerank", json=body)
    assert by_name.status_code == 200 and by_name.json()["model"] == PACKAGED_EMBEDDING_NAME


@pytest.mark.parametrize("client_name", ["cosine_client", "reranker_client"])
def test_v2_max_tokens_per_doc_scores_each_documents_first_tokens(client_name, request):
    """Cohere v2's ``max_tokens_per_doc``: a document is scored as its first N tokens. These
    documents are words that each tokenizer keeps whole, so N tokens are the first N words."""
    client = request.getfixturevalue(client_name)
    query, documents = "the weather today", ["the weather is nice today", "a cat sat on the mat", "hello world"]
    clipped = [" ".join(d.split()[:2]) for d in documents]
    v2 = client.post("/v2/rerank", json={"query": query, "documents": documents, "max_tokens_per_doc": 2})
    assert v2.status_code == 200, v2.text
    got = {x["index"]: x["relevance_score"] for x in v2.json()["results"]}
    by_hand = client.post("/v1/rerank", json={"query": query, "documents": clipped}).json()
    expected = {x["index"]: x["relevance_score"] for x in by_hand["results"]}
    assert got.keys() == expected.keys() and all(abs(got[i] - expected[i]) < 1e-6 for i in got)
    whole = client.post("/v2/rerank", json={"query": query, "documents": documents}).json()
    assert v2.json()["meta"]["tokens"]["input_tokens"] < whole["meta"]["tokens"]["input_tokens"]


def test_models_list_rerank_models_with_their_kind(reranker_client):
    cards = {c["id"]: c for c in reranker_client.get("/v1/models").json()["data"]}
    assert cards["tiny-reranker"]["kind"] == "rerank" and cards["tiny-reranker"]["context_length"] == 64
    assert cards[PACKAGED_EMBEDDING_NAME]["kind"] == "embedding"
    seed = {c["id"]: c for c in reranker_client.get("/models").json()["data"]}
    assert seed["tiny-reranker"]["object"] == "rerank"
    assert reranker_client.get("/v1/models/tiny-reranker").json()["kind"] == "rerank"


def test_metrics_count_the_cross_encoders_pairs(reranker_client):
    reranker_client.post("/v1/rerank", json={"model": "tiny-reranker", "query": "a", "documents": ["b", "c", "d"]})
    text = reranker_client.get("/metrics").text
    line = next(l for l in text.splitlines() if l.startswith('glm_api_rerank_pairs_total{model="tiny-reranker"}'))
    assert float(line.split()[-1]) >= 3
    assert 'glm_api_rerank_batch_size_count{model="tiny-reranker"}' in text
