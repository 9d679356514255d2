"""The seed routes on a real uvicorn server: streaming timing, concurrency, disconnects, start-up."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e.conftest import NO_KERNEL_TIMING, REPO, start_server, stop_server, timed_sse_events

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


async def timed_stream(client: httpx.AsyncClient, url: str, body: dict) -> list[tuple[float, object]]:
    """(seconds since the request, payload) for every SSE data event, read as it arrives."""
    start = time.monotonic()
    async with client.stream("POST", f"{url}/chat", json=body) as response:
        assert response.status_code == 200
        return await timed_sse_events(response, start)


def test_events_leave_as_tokens_are_generated(live_server):
    events = asyncio.run(
        _with_client(lambda c: timed_stream(c, live_server.url, {"stream": True, "messages": QUESTION, "max_tokens": 48, "temperature": 0}))
    )
    content_times = [t for t, e in events if e != "[DONE]" and e["choices"][0]["delta"].get("content")]
    assert len(content_times) > 10
    first, last = content_times[0], content_times[-1]
    # Streamed, not buffered: the first token arrives long before the last one.
    assert first < 0.5 * last, (first, last)
    assert events[-1][1] == "[DONE]"


def test_other_routes_answer_while_streams_run(live_server):
    async def scenario(client: httpx.AsyncClient):
        body = {"stream": True, "messages": QUESTION, "max_tokens": 64, "temperature": 0.7}
        streams = [asyncio.create_task(timed_stream(client, live_server.url, body)) for _ in range(3)]
        await asyncio.sleep(1.0)  # let them get going
        started = time.monotonic()
        models = await client.get(f"{live_server.url}/models")
        embedding = await client.post(f"{live_server.url}/embedding", json={"prompt": "hello"})
        side_latency = time.monotonic() - started
        results = await asyncio.gather(*streams)
        return models, embedding, side_latency, results

    models, embedding, side_latency, results = asyncio.run(_with_client(scenario))
    assert models.status_code == 200 and embedding.status_code == 200
    stream_time = max(r[-1][0] for r in results)
    assert side_latency < stream_time / 2, (side_latency, stream_time)
    for events in results:  # every stream progressed and finished
        finishes = [e["choices"][0]["finish_reason"] for _, e in events if e != "[DONE]"]
        assert finishes[-1] in {"stop", "length"}
        assert sum(1 for _, e in events if e != "[DONE]" and e["choices"][0]["delta"].get("content")) > 3


@pytest.fixture(scope="module")
def one_slot_server(smollm2_cache_dir, tmp_path_factory):
    """Room for one running sequence: whatever holds the slot shows in the next request's wait."""
    server = start_server(
        ["--cache-dir", str(smollm2_cache_dir), "--max-running", "1", "--shutdown-grace-seconds", "120",
         *NO_KERNEL_TIMING],
        tmp_path_factory.mktemp("one-slot") / "server.log",
    )
    yield server
    stop_server(server)


def test_disconnect_frees_the_slot(one_slot_server):
    server = one_slot_server

    async def scenario(client: httpx.AsyncClient):
        body = {"stream": True, "messages": QUESTION, "max_tokens": 2000, "temperature": 0.9, "repetition_penalty": 1.0}
        async with client.stream("POST", f"{server.url}/chat", json=body) as response:
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    seen += 1
                if seen >= 3:
                    break  # leave mid-stream
        started = time.monotonic()
        answer = await client.post(
            f"{server.url}/chat", json={"messages": QUESTION, "max_tokens": 4, "temperature": 0}, timeout=60
        )
        return answer, time.monotonic() - started

    answer, waited = asyncio.run(_with_client(scenario))
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    # 2000 tokens would take minutes on this CPU; freed, the next one needs seconds.
    assert waited < 20, waited


def test_sigterm_lets_a_running_stream_finish(one_slot_server):
    """Runs last in this module: it stops the server."""
    server = one_slot_server

    async def scenario(client: httpx.AsyncClient):
        body = {"stream": True, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
        events = []
        async with client.stream("POST", f"{server.url}/chat", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
                if len(events) == 2:
                    server.process.send_signal(signal.SIGTERM)  # mid-stream
        return events

    events = asyncio.run(_with_client(scenario))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"  # all 12 tokens came
    assert server.process.wait(timeout=120) == 0
    assert "Waiting for connections to close" in server.log() or "Shutting down" in server.log()


def test_missing_model_path_stops_start_up_with_a_clear_message():
    result = subprocess.run(
        [sys.executable, "api.py", "--chat-model", "/no/such/model", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "/no/such/model" in output and "does not exist" in output


def test_help_lists_the_settings():
    result = subprocess.run([sys.executable, "api.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--chat-model", "--embedding-model", "--device", "--dtype"):
        assert flag in result.stdout


async def _with_client(scenario):
    async with httpx.AsyncClient(timeout=120) as client:
        return await scenario(client)


def test_unservable_folder_is_refused_at_start_up(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    result = subprocess.run(
        [sys.executable, "api.py", "--chat-model", str(tmp_path), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert f"cannot serve {tmp_path}" in result.stdout + result.stderr


def test_corrupt_weights_exit_non_zero_with_one_clear_message(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"this is not a safetensors file")
    result = subprocess.run(
        [sys.executable, "api.py", "--chat-model", str(broken), "--host", "127.0.0.1", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-2000:]
    assert "model loading failed" in output
