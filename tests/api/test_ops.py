"""Operator routes reflect the engines' real state; absurd n is a 400."""

from __future__ import annotations

from fastapi.testclient import TestClient

from glm_api.app import create_app
from tests.conftest import make_registry, make_settings


def test_health_and_ready_report_a_dead_engine(smollm2, minilm):
    settings = make_settings()
    registry = make_registry(smollm2, {"m": minilm}, settings)
    with TestClient(create_app(settings, registry)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        registry.chat.stop()  # its worker thread is gone: nothing can generate any more
        health = client.get("/health")
        assert health.status_code == 503 and "not running" in health.json()["detail"]
        assert client.get("/ready").status_code == 503
        chat = client.post("/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 503
        assert chat.json()["error"]["type"] == "service_unavailable"
        assert client.post("/embedding", json={"prompt": "still fine"}).status_code == 200


def test_absurd_n_is_400(client):
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "n": 10**6}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
