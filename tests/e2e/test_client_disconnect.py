"""A client that leaves a non-streamed request: a cancelled request, not a server error.

Real uvicorn runs the app in a thread of this process, so its log records (uvicorn's own
"Exception in ASGI application" among them) reach ``caplog``. The chat model is a tiny ChatGLM3
whose greedy answer runs to max_tokens (thousands of steps, seconds), so the client's timeout
always fires while the engine is still generating.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import httpx
import pytest
import uvicorn

from glm_api.app import create_app
from glm_api.registry import build_registry
from tests.conftest import make_settings
from tests.e2e.conftest import free_port
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3

pytestmark = pytest.mark.e2e

MODEL = "glm-long"
MESSAGES = [{"role": "user", "content": "hello"}]
LONG = {"max_tokens": 8000, "temperature": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("disconnect")
    folder = build_tiny_chatglm3(root / "model", seq_length=8192)
    settings = make_settings(
        chat_model=str(folder), chat_model_name=MODEL, device="cpu", model_dir=root / "empty",
        cache_dir=root / "cache", data_dir=root / "data", kv_cache_tokens=16384,
    )
    app = create_app(settings, build_registry(settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    while httpx.get(f"{url}/ready").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.2)
    yield url, app.state.glm.services.registry.chat
    server.should_exit = True
    thread.join(60)


def wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **LONG}),
        ("/v1/completions", {"model": MODEL, "prompt": "hello", **LONG}),
        ("/v1/responses", {"model": MODEL, "input": "hello", "max_output_tokens": 8000, "temperature": 0}),
        ("/chat", {"messages": MESSAGES, **LONG}),
    ],
)
def test_a_client_that_leaves_is_logged_as_cancelled_and_its_request_aborted(served, caplog, route, body):
    url, engine = served
    aborted_before = engine.stats.finished["abort"]
    request_id = f"req-leaves-{route.strip('/').replace('/', '-')}"
    with caplog.at_level(logging.INFO):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{url}{route}", json=body, headers={"x-request-id": request_id}, timeout=1.5)
        access = lambda: [r for r in caplog.records if r.name == "glm_api.access" and request_id in r.getMessage()]
        wait_for(lambda: access() and engine.num_running == 0 and engine.num_waiting == 0)

    # The engine dropped the request and gave its KV blocks back.
    assert engine.stats.finished["abort"] == aborted_before + 1
    used, _, _ = engine.kv_blocks
    assert used == 0
    # Nothing at warning or above, no traceback: one info line naming the request.
    loud = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, loud
    assert not [r for r in caplog.records if r.exc_info]
    (cancelled,) = [r for r in caplog.records if "cancelled" in r.getMessage() and request_id in r.getMessage()]
    assert cancelled.levelno == logging.INFO and "disconnect" in cancelled.getMessage()
    # The access log and the metrics count a 499 (client closed request), never a 500.
    (line,) = access()
    assert f"POST {route} 499" in line.getMessage()
    metrics = httpx.get(f"{url}/metrics").text
    assert not re.search(r'glm_api_http_requests_total\{[^}]*status="500"', metrics)
    assert re.search(rf'glm_api_http_requests_total\{{method="POST",route="{route}",status="499"\}} [1-9]', metrics)
