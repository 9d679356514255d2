"""The OpenAI Responses API routes: parse, call :mod:`glm_api.serving.responses` (streamed:
:mod:`glm_api.serving.responses_stream`), return."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from glm_api.deps import OwnerDep, RequestIdDep, ResponseStoreDep, ServicesDep, until_disconnect
from glm_api.errors import BadRequestError
from glm_api.protocol.common import ERROR_RESPONSES, typed_stream_response
from glm_api.protocol.responses import InputItemList, ResponseDeleted, ResponseObject, ResponseStreamEventData
from glm_api.protocol.responses_request import ResponseCreateRequest
from glm_api.serving import responses
from glm_api.serving.responses_stream import response_stream
from glm_api.serving.sse import typed_sse_response

router = APIRouter(prefix="/v1", tags=["OpenAI Responses API"], responses=ERROR_RESPONSES)


@router.post("/responses", response_model=ResponseObject, responses=typed_stream_response(ResponseStreamEventData))
async def create_response(
    body: ResponseCreateRequest, request: Request, services: ServicesDep, store: ResponseStoreDep, owner: OwnerDep,
    request_id: RequestIdDep,
):
    """Create a response (OpenAI's Responses API). With ``stream: true``, typed server-sent
    events, each with its ``sequence_number`` and its type as the SSE event name:
    ``response.created``, ``response.in_progress``; per output item
    ``response.output_item.added``, then ``response.content_part.added``,
    ``response.output_text.delta``..., ``response.output_text.done``,
    ``response.content_part.done`` (a message), ``response.reasoning_text.delta``/``.done``
    (reasoning) or ``response.function_call_arguments.delta``/``.done`` (a call), then
    ``response.output_item.done``; last ``response.completed`` or ``response.incomplete``
    (max_output_tokens reached). A failure after the 200: ``error``, then ``response.failed``."""
    plan = await responses.start_response(services.chat, store, owner, body, request_id)
    if body.stream:
        return typed_sse_response(response_stream(plan), request_id)
    return await until_disconnect(request, responses.create_response(plan))


@router.get("/responses/{response_id}", response_model=ResponseObject)
async def get_response(
    response_id: str, store: ResponseStoreDep, owner: OwnerDep,
    stream: Annotated[bool, Query(json_schema_extra={"enum": [False]})] = False,
) -> ResponseObject:
    if stream:
        raise BadRequestError("streaming a stored response again is not supported; it is complete", param="stream")
    return await responses.get_response(store, owner, response_id)


@router.delete("/responses/{response_id}", response_model=ResponseDeleted)
async def delete_response(response_id: str, store: ResponseStoreDep, owner: OwnerDep) -> ResponseDeleted:
    return await responses.delete_response(store, owner, response_id)


@router.get("/responses/{response_id}/input_items", response_model=InputItemList)
async def list_input_items(
    response_id: str, store: ResponseStoreDep, owner: OwnerDep, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20, order: Literal["asc", "desc"] = "desc",
) -> InputItemList:
    return await responses.list_input_items(store, owner, response_id, after, limit, order)
