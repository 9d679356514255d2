"""LangChain's OpenAI integrations against the real server, changing only the base URL."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from glm_api.registry import PACKAGED_CHAT_NAME, PACKAGED_EMBEDDING_NAME

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"


def test_chat_openai_invoke_and_stream(live_server):
    llm = ChatOpenAI(
        model=PACKAGED_CHAT_NAME,
        base_url=f"{live_server.url}/v1",
        api_key="x",
        temperature=0,
        max_tokens=8,
        max_retries=0,
        stream_usage=True,
    )
    answer = llm.invoke(QUESTION)
    assert answer.content and answer.response_metadata["finish_reason"] in {"stop", "length"}
    assert answer.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream(QUESTION))
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(c.content for c in chunks) == answer.content
    assert (
        sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata)
        == answer.usage_metadata["output_tokens"]
    )


def test_openai_embeddings(live_server):
    # check_embedding_ctx_length=False: otherwise LangChain sends tiktoken ids (OpenAI's
    # vocabulary, and a download), which mean nothing to a local model.
    embedder = OpenAIEmbeddings(
        model=PACKAGED_EMBEDDING_NAME,
        base_url=f"{live_server.url}/v1",
        api_key="x",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    texts = ["The cat sits on the mat.", "Stock markets fell."]
    documents = np.array(embedder.embed_documents(texts), dtype=np.float32)
    query = np.array(embedder.embed_query(texts[0]), dtype=np.float32)
    seed = np.array(
        httpx.post(f"{live_server.url}/embedding", json={"prompt": texts}, timeout=60).json()["data"], dtype=np.float32
    )
    np.testing.assert_allclose(documents, seed, atol=1e-6)
    np.testing.assert_allclose(query, seed[0], atol=1e-6)
