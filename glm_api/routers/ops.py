"""Operator routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from glm_api.deps import AppStateDep
from glm_api.errors import EngineUnavailableError

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(state: AppStateDep) -> JSONResponse:
    """200 while the process can serve or is still loading; 503 when an engine has died. With
    several chat replicas, each is listed (index, device, state, load); one that died makes the
    status ``degraded``, still 200, and only none left serving makes it 503."""
    if state.load_error:
        return JSONResponse({"status": "error", "detail": state.load_error}, status_code=503)
    body: dict = {"status": "ok"}
    if state.services is not None:
        registry = state.services.registry
        replicas = registry.replica_status()
        if replicas is not None:
            body["replicas"] = replicas
            if any(replica["state"] != "ok" for replica in body["replicas"]):
                body["status"] = "degraded"
        try:
            registry.check_health()
        except EngineUnavailableError as exc:
            return JSONResponse({**body, "status": "error", "detail": exc.message}, status_code=503)
    return JSONResponse(body)


@router.get("/ready")
async def ready(state: AppStateDep) -> JSONResponse:
    """200 once every model is loaded and its engine runs; 503 before."""
    if state.services is None:
        return JSONResponse({"status": "loading" if not state.load_error else "error"}, status_code=503)
    try:
        state.services.registry.check_health()
    except EngineUnavailableError as exc:
        return JSONResponse({"status": "error", "detail": exc.message}, status_code=503)
    return JSONResponse({"status": "ready"})


#: Prometheus' text exposition format (prometheus_client's CONTENT_TYPE_LATEST), not JSON.
METRICS_RESPONSE = {
    200: {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


@router.get("/metrics", response_class=Response, responses=METRICS_RESPONSE)
async def metrics(request: Request) -> Response:
    """Prometheus text format: requests by route and status, engine queues, batches, TTFT, tokens."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
