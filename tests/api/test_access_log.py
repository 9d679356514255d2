"""One access-log line per request: id, route, status, latency, tokens; never the prompt."""

from __future__ import annotations

import logging

SECRET_PROMPT = "my bank password is hunter2, what is the capital of France?"


def access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "glm_api.access"]


def test_chat_request_is_logged_with_tokens_and_without_text(client, caplog):
    with caplog.at_level(logging.INFO, logger="glm_api.access"):
        response = client.post("/chat", json={"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 5})
    usage = response.json()["usage"]
    (line,) = [l for l in access_lines(caplog) if response.headers["x-request-id"] in l]
    assert "POST /chat 200" in line
    assert f"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}" in line
    assert "ms" in line
    assert "hunter2" not in caplog.text


def test_streamed_and_embedding_requests_count_their_tokens(client, caplog):
    with caplog.at_level(logging.INFO, logger="glm_api.access"):
        stream = client.post("/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
        embedding = client.post("/embedding", json={"prompt": ["hello world", "good morning"]})
    lines = access_lines(caplog)
    (stream_line,) = [l for l in lines if stream.headers["x-request-id"] in l]
    assert "completion_tokens=3" in stream_line
    (embedding_line,) = [l for l in lines if embedding.headers["x-request-id"] in l]
    assert f"prompt_tokens={embedding.json()['usage']['prompt_tokens']}" in embedding_line


def test_errors_are_logged_too(client, caplog):
    with caplog.at_level(logging.INFO, logger="glm_api.access"):
        response = client.post("/chat", json={"messages": []})
    (line,) = [l for l in access_lines(caplog) if response.headers["x-request-id"] in l]
    assert "POST /chat 400" in line
