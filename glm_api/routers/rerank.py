"""Rerank and score routes (Jina/Cohere v1, Cohere v2, vLLM's score): parse, call serving, return."""

from __future__ import annotations

from fastapi import APIRouter

from glm_api.deps import RequestIdDep, ServicesDep
from glm_api.protocol.common import ERROR_RESPONSES
from glm_api.protocol.rerank import (
    RerankRequest,
    RerankResponse,
    RerankV2Request,
    RerankV2Response,
    ScoreRequest,
    ScoreResponse,
)
from glm_api.serving import rerank as serving

router = APIRouter(tags=["rerank and score"], responses=ERROR_RESPONSES)


@router.post("/rerank", response_model=RerankResponse)
@router.post("/v1/rerank", response_model=RerankResponse)
async def rerank(body: RerankRequest, services: ServicesDep, request_id: RequestIdDep) -> RerankResponse:
    return await serving.rerank(services.rerank, body, request_id)


@router.post("/v2/rerank", response_model=RerankV2Response)
async def rerank_v2(body: RerankV2Request, services: ServicesDep, request_id: RequestIdDep) -> RerankV2Response:
    return await serving.rerank_v2(services.rerank, body, request_id)


@router.post("/score", response_model=ScoreResponse)
@router.post("/v1/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, services: ServicesDep, request_id: RequestIdDep) -> ScoreResponse:
    return await serving.score(services.rerank, body, request_id)
