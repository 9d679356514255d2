"""Pieces shared by the seed and OpenAI wire models."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: Far above any context we serve; larger values are a client bug, answered with a 400.
MAX_TOKENS_LIMIT = 1_000_000


def _check_stop(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > 16:
        raise ValueError("at most 16 stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


Stop = Annotated[str | list[str] | None, AfterValidator(_check_stop)]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class WireModel(BaseModel):
    """Request models accept unknown fields (clients send extras) and ignore them.

    NaN and Infinity (which Python's JSON parser lets through) are refused outright rather
    than failing a range check with a confusing message."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
# A penalty divides logits: near zero it turns them into infinities, so keep it sane.
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=10.0)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body; every non-2xx answer of this server has this shape."""

    error: ErrorDetail


#: Documented on every router, so the OpenAPI spec (and clients generated from it) know the
#: statuses the server really answers with.
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "invalid request (validation, context length)"),
        (401, "missing or invalid API key"),
        (404, "unknown model or route"),
        (413, "request body too large"),
        (415, "body is not JSON"),
        (429, "server busy: retry after the Retry-After header"),
        (500, "unexpected error (details in the server log, by request id)"),
        (503, "models loading or an engine unavailable"),
    ]
}

def streamed_response(chunk_model: type[BaseModel]) -> dict[int | str, dict]:
    """The 200 of a route that streams with ``stream: true``: JSON, or server-sent events whose
    ``data`` is JSON of ``chunk_model`` (an ``{"error": ...}`` object for a failure after the 200)
    and, last, the literal ``[DONE]``.

    The event is described by ``itemSchema`` (OpenAPI 3.2's way for sequential media, which
    FastAPI's own SSE routes emit too), so a client or a fuzzer can check every chunk. The
    referenced schemas are added to the spec's components by ``glm_api.openapi``."""
    chunk = {"anyOf": [_component_ref(chunk_model), _component_ref(ErrorResponse)]}
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "then": True,
                "else": {"contentMediaType": "application/json", "contentSchema": chunk},
            },
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }
    return {200: {"content": {"text/event-stream": {"itemSchema": event}}, "description": "JSON, or SSE when streaming"}}


def _component_ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def typed_stream_response(event_model: type[BaseModel]) -> dict[int | str, dict]:
    """The 200 of a route that streams typed events with ``stream: true`` (the Responses API):
    JSON, or server-sent events whose ``event`` is the payload's ``type`` and whose ``data`` is
    JSON of ``event_model``; no ``[DONE]`` follows (OpenAI ends these streams with the last
    event). Its schema is added to the spec's components by ``glm_api.openapi``."""
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": _component_ref(event_model)},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }
    return {200: {"content": {"text/event-stream": {"itemSchema": event}}, "description": "JSON, or SSE when streaming"}}
