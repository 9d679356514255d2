"""The OpenAI API routes under /v1: parse, call serving, return (see glm_api/serving/openai_*)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from glm_api.deps import RequestIdDep, ServicesDep, until_disconnect
from glm_api.protocol.common import ERROR_RESPONSES, streamed_response
from glm_api.protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)
from glm_api.protocol.tokenizer import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from glm_api.serving import openai_chat, openai_completions, openai_embeddings, openai_models
from glm_api.serving.sse import sse_response

router = APIRouter(prefix="/v1", tags=["OpenAI API"], responses=ERROR_RESPONSES)


@router.post("/chat/completions", response_model=ChatCompletion, responses=streamed_response(ChatCompletionChunk))
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: ServicesDep, request_id: RequestIdDep
):
    plan = await openai_chat.start_chat(services.chat, body, request_id)
    if body.stream:
        return sse_response(openai_chat.chat_stream(plan), request_id)
    return await until_disconnect(request, openai_chat.chat_response(plan))


@router.post("/completions", response_model=Completion, responses=streamed_response(Completion))
async def completions(body: CompletionRequest, request: Request, services: ServicesDep, request_id: RequestIdDep):
    plan = await openai_completions.start_completion(services.chat, body, request_id)
    if body.stream:
        return sse_response(openai_completions.completion_stream(plan), request_id)
    return await until_disconnect(request, openai_completions.completion_response(plan))


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, services: ServicesDep) -> EmbeddingResponse:
    return await openai_embeddings.create_embeddings(services.embeddings, body)


@router.get("/models", response_model=ModelList)
async def models(services: ServicesDep) -> ModelList:
    return openai_models.list_models(services.registry)


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, services: ServicesDep) -> ModelCard:
    return openai_models.get_model(services.registry, model_id)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, services: ServicesDep) -> TokenizeResponse:
    return await openai_models.tokenize(services.chat, services.tokenize, body)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, services: ServicesDep) -> DetokenizeResponse:
    return await openai_models.detokenize(services.tokenize, body)
