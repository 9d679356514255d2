"""A real server: ``python api.py`` in a subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

#: For servers started to test something other than the projections: ``--cpu-kernels auto`` (the
#: default) times every projection shape at each start, ~10 s for SmolLM2 on a 2-core CPU. The
#: session's ``live_server`` and ``responses_server`` keep the default, so the timed choice is
#: still served end to end; tests/families/test_dense_kernels.py checks the kernels' arithmetic.
NO_KERNEL_TIMING = ["--cpu-kernels", "off"]


async def timed_sse_events(response: httpx.Response, started: float | None = None) -> list[tuple[float, object]]:
    """(seconds since ``started``, default now, payload) for every SSE data event, as it arrives."""
    started = time.monotonic() if started is None else started
    events = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append((time.monotonic() - started, data if data == "[DONE]" else json.loads(data)))
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None, ready_timeout: float = 180) -> LiveServer:
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    log_file = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "api.py", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
    )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # each start is seen ready ~0.15 s sooner than at 0.5 s, for a few 503s more
    stop_server(server)
    raise RuntimeError(f"server not ready in {ready_timeout} s:\n{server.log()}")


def stop_server(server: LiveServer, timeout: float = 30) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def live_server(smollm2_cache_dir, tmp_path_factory) -> LiveServer:
    """The packaged defaults served by real uvicorn (GGUF conversion reused from the session)."""
    log_path = tmp_path_factory.mktemp("live-server") / "server.log"
    server = start_server(["--cache-dir", str(smollm2_cache_dir)], log_path)
    yield server
    stop_server(server)


#: The API keys of ``responses_server``: what one key stores, the other cannot see.
RESPONSES_KEYS = ("resp-key-a", "resp-key-b")


@pytest.fixture(scope="session")
def responses_server(smollm2_cache_dir, tmp_path_factory) -> LiveServer:
    """The packaged defaults with two API keys, storing responses under a temporary data dir."""
    logs = tmp_path_factory.mktemp("responses-server")
    args = ["--cache-dir", str(smollm2_cache_dir), "--data-dir", str(logs / "data")]
    for key in RESPONSES_KEYS:
        args += ["--api-key", key]
    server = start_server(args, logs / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def tool_lm_server(tool_calling_lm_dir, tmp_path_factory) -> LiveServer:
    """A tiny model trained to call a weather tool (tests/fixtures/tool_calling_lm.py), served
    as ``tool-lm``, storing responses under a temporary data dir."""
    root = tmp_path_factory.mktemp("tool-lm-server")
    server = start_server(["--chat-model", str(tool_calling_lm_dir), "--chat-model-name", "tool-lm", "--data-dir",
                           str(root / "data"), *NO_KERNEL_TIMING], root / "server.log")
    yield server
    stop_server(server)
