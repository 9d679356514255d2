"""The seed GLM-API routes, with the seed's exact shapes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from glm_api.deps import RequestIdDep, ServicesDep, until_disconnect
from glm_api.protocol.common import ERROR_RESPONSES, streamed_response
from glm_api.protocol.seed import (
    SeedChatChunk,
    SeedChatRequest,
    SeedChatResponse,
    SeedEmbeddingRequest,
    SeedEmbeddingResponse,
    SeedModelList,
    SeedTokenizeRequest,
    SeedTokenizeResponse,
)
from glm_api.serving import seed
from glm_api.serving.sse import sse_response

router = APIRouter(tags=["seed GLM-API"], responses=ERROR_RESPONSES)


@router.post("/chat", response_model=SeedChatResponse, responses=streamed_response(SeedChatChunk))
async def chat(body: SeedChatRequest, request: Request, services: ServicesDep, request_id: RequestIdDep):
    run = await services.chat.start(seed.seed_chat_call(body), request_id)
    if body.stream:
        return sse_response(seed.seed_chat_stream(run, body, request_id), request_id)
    return await until_disconnect(request, seed.seed_chat_response(run, body, request_id))


@router.post("/embedding", response_model=SeedEmbeddingResponse)
async def embedding(body: SeedEmbeddingRequest, services: ServicesDep) -> SeedEmbeddingResponse:
    return await seed.seed_embedding(services.embeddings, body)


@router.post("/tokenize", response_model=SeedTokenizeResponse)
async def tokenize(body: SeedTokenizeRequest, services: ServicesDep) -> SeedTokenizeResponse:
    return await seed.seed_tokenize(services.tokenize, body)


@router.get("/models", response_model=SeedModelList)
async def models(services: ServicesDep) -> SeedModelList:
    return seed.seed_models(services.registry)
