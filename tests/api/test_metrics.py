"""GET /metrics: Prometheus text that parses, with counters that move with the traffic."""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from glm_api.app import create_app
from glm_api.engines.base import SamplingParams
from glm_api.registry import PACKAGED_CHAT_NAME, PACKAGED_EMBEDDING_NAME
from tests.conftest import make_registry, make_settings


def scrape(client) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of every sample in the exposition."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (over the labels not named, such as
    the chat engine's ``replica``)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= set(have))


def test_metrics_parse_and_count_requests_and_tokens(client):
    before = scrape(client)
    chat = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, "temperature": 0}
    assert client.post("/chat", json=chat).status_code == 200
    assert client.post("/embedding", json={"prompt": ["one", "two"]}).status_code == 200
    assert client.post("/chat", json={"messages": []}).status_code == 400
    assert client.get("/no/such/path/123").status_code == 404
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "glm_api_http_requests_total"
    assert moved(requests, method="POST", route="/chat", status="200") == 1
    assert moved(requests, method="POST", route="/chat", status="400") == 1
    assert moved(requests, method="POST", route="/embedding", status="200") == 1
    # Unknown paths share one label value: a scanner cannot blow up the label set.
    assert moved(requests, method="GET", route="<unmatched>", status="404") == 1
    assert not any("/no/such" in str(labels) for _, labels in after)

    model = {"model": PACKAGED_CHAT_NAME}
    assert moved("glm_api_chat_generated_tokens_total", **model) == 3
    assert moved("glm_api_chat_prompt_tokens_total", **model) > 0
    assert moved("glm_api_chat_time_to_first_token_seconds_count", **model) == 1
    assert moved("glm_api_chat_batch_size_count", **model) >= 2  # decode steps after the prefill
    assert moved("glm_api_chat_step_seconds_count", **model) >= 2  # every step timed
    assert moved("glm_api_chat_step_seconds_sum", **model) > 0
    assert moved("glm_api_chat_requests_finished_total", reason="length", **model) == 1
    assert value(after, "glm_api_chat_running_sequences", **model) == 0
    assert value(after, "glm_api_chat_waiting_requests", **model) == 0
    emb = {"model": PACKAGED_EMBEDDING_NAME}
    assert moved("glm_api_embedding_texts_total", **emb) == 2
    assert moved("glm_api_embedding_batch_size_sum", **emb) == 2
    assert ("glm_api_queue_rejections_total", (("engine", "chat"), ("model", PACKAGED_CHAT_NAME))) in after


def test_each_app_has_its_own_registry_and_counts_queue_rejections(smollm2, client):
    settings = make_settings(max_running=1, max_waiting=0)
    registry = make_registry(smollm2, {}, settings)
    with TestClient(create_app(settings, registry)) as own:
        fresh = scrape(own)
        assert value(fresh, "glm_api_http_requests_total", method="POST", route="/chat", status="200") == 0

        async def refused_request():
            holder = registry.chat.generate([1, 2, 3], SamplingParams(max_tokens=500, temperature=0.0), "holder")
            await holder.__anext__()
            try:
                return await asyncio.to_thread(own.post, "/chat", json={"messages": [{"role": "user", "content": "hi"}]})
            finally:
                await holder.aclose()

        assert asyncio.run(refused_request()).status_code == 429
        after = scrape(own)
    labels = {"engine": "chat", "model": PACKAGED_CHAT_NAME}
    assert value(after, "glm_api_queue_rejections_total", **labels) == 1
    assert value(after, "glm_api_http_requests_total", method="POST", route="/chat", status="429") == 1
