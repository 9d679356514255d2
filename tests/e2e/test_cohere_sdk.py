"""Cohere's own Python SDK against a real server (``python api.py --rerank-model NAME=PATH``):
v2 and v1 rerank work unchanged, with an API key, and return the cross-encoder's scores."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import CrossEncoder

from tests.e2e.conftest import start_server, stop_server

cohere = pytest.importorskip("cohere")

KEY = "cohere-test-key"
QUERY = "the weather today"
DOCUMENTS = ["the weather is nice today", "a cat sat on the mat", "今天天气很好", "hello world", "i like apples"]


@pytest.fixture(scope="module")
def server(tiny_reranker_dir, tmp_path_factory):
    live = start_server(
        ["--disable-chat", "--rerank-model", f"tiny-reranker={tiny_reranker_dir}", "--api-key", KEY],
        tmp_path_factory.mktemp("cohere") / "server.log",
    )
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def expected(tiny_reranker_dir):
    model = CrossEncoder(str(tiny_reranker_dir), device="cpu", local_files_only=True)
    return model.predict([(QUERY, d) for d in DOCUMENTS])


def test_cohere_v2_client_reranks(server, expected):
    client = cohere.ClientV2(api_key=KEY, base_url=server.url)
    response = client.rerank(model="tiny-reranker", query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [r.index for r in response.results] == list(np.argsort(-expected, kind="stable"))[:3]
    for r in response.results:
        assert abs(r.relevance_score - expected[r.index]) < 1e-5


def test_cohere_v1_client_reranks_with_documents(server, expected):
    client = cohere.Client(api_key=KEY, base_url=server.url)
    response = client.rerank(model="tiny-reranker", query=QUERY, documents=DOCUMENTS, return_documents=True)
    assert [r.index for r in response.results] == list(np.argsort(-expected, kind="stable"))
    assert [r.document.text for r in response.results] == [DOCUMENTS[r.index] for r in response.results]


def test_a_wrong_key_raises_the_sdks_own_error(server):
    client = cohere.ClientV2(api_key="wrong", base_url=server.url)
    with pytest.raises(cohere.core.api_error.ApiError) as caught:
        client.rerank(model="tiny-reranker", query=QUERY, documents=DOCUMENTS)
    assert caught.value.status_code == 401
