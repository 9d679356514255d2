"""The container's health check (the Dockerfile's HEALTHCHECK command, run as Docker runs it)
against the real app served by uvicorn: ready only once the models are loaded, on whatever port
the ``GLM_API_*`` environment gives the server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from glm_api.app import create_app
from glm_api.config import Settings
from tests.conftest import make_registry
from tests.e2e.conftest import free_port
from tests.unit.test_deploy_files import REPO, dockerfile_env


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's exec form, with this interpreter for the image's ``python``."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    command = json.loads(re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, re.M).group(1))
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    """The check inside the container: the image's ENV, with the port compose would set."""
    env = {**os.environ, **dockerfile_env(), "GLM_API_PORT": str(port)}
    return subprocess.run(healthcheck_command(), cwd=REPO, env=env, capture_output=True, text=True, timeout=30)


@contextmanager
def serving(app, settings: Settings, lifespan: str = "on") -> Iterator[None]:
    """uvicorn on the settings' host and port in a thread, as ``python api.py`` would serve."""
    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan=lifespan, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(30)


def container_settings(port: int) -> Settings:
    """What the server in the container reads: the image's ENV plus GLM_API_PORT."""
    env = {**dockerfile_env(), "GLM_API_PORT": str(port)}
    values = {key.removeprefix("GLM_API_").lower(): value for key, value in env.items() if key.startswith("GLM_API_")}
    return Settings(_env_file=None, disable_chat=True, **values)


def test_check_passes_only_once_ready_on_the_configured_port(minilm):
    port = free_port()
    assert port != 8100
    settings = container_settings(port)
    assert (settings.host, settings.port) == ("0.0.0.0", port)
    registry = make_registry(None, {"m": minilm}, settings)
    with serving(create_app(settings, registry), settings):
        ready = run_healthcheck(port)
        assert ready.returncode == 0, ready.stdout + ready.stderr
        assert f"127.0.0.1:{port}/ready: 200" in ready.stdout
        # The same ready server, asked on a port it does not listen on: unhealthy.
        wrong = run_healthcheck(free_port())
        assert wrong.returncode == 1
        assert "refused" in wrong.stdout.lower()


def test_check_fails_while_the_models_are_loading():
    # Without its lifespan the app never starts loading: /ready stays 503 "loading" and
    # /health 200, which the old check (GET /health) took for healthy.
    port = free_port()
    settings = container_settings(port)
    with serving(create_app(settings), settings, lifespan="off"):
        loading = run_healthcheck(port)
        assert loading.returncode == 1
        assert re.search(rf":{port}/ready: 503 .*loading", loading.stdout), loading.stdout
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
