"""Pieces shared by the seed and OpenAI wire models."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict
from pydantic_core import PydanticCustomError
from pydantic.fields import FieldInfo

#: Far above any context we serve; larger values are a client bug, answered with a 400.
MAX_TOKENS_LIMIT = 1_000_000


def stated(**keywords: Any) -> FieldInfo:
    """JSON Schema keywords for the spec, beside a rule that a validator or serving enforces
    (``Annotated[list[str], stated(minItems=1)]``): validation is unchanged, and the spec says
    what the server refuses, so a client (or a fuzzer) generated from it sends what is served."""
    return Field(json_schema_extra=keywords)


#: A token id as the spec states it: never negative (the upper bound is the model's vocabulary,
#: which the served spec adds: ``glm_api.openapi``).
TOKEN_ID_SCHEMA: dict[str, Any] = {"type": "integer", "minimum": 0}


def _check_stop(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > 16:
        raise ValueError("at most 16 stop sequences")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


Stop = Annotated[
    Annotated[str, stated(minLength=1)] | Annotated[list[Annotated[str, stated(minLength=1)]], stated(maxItems=16)] | None,
    AfterValidator(_check_stop),
]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class WireModel(BaseModel):
    """Request models accept unknown fields (clients send extras) and ignore them.

    NaN and Infinity (which Python's JSON parser lets through) are refused outright rather
    than failing a range check with a confusing message."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class JsonWireModel(WireModel):
    """A request of the OpenAI API: JSON's types as they are, as OpenAI takes them. A boolean is
    ``true`` or ``false`` (not ``0`` or ``"true"``), a number or an integer is not a string,
    so the server accepts what its spec says and refuses the rest. (The seed's models keep
    pydantic's coercions: its clients may rely on them.)"""

    model_config = ConfigDict(strict=True)


def _json_integer(value: Any) -> Any:
    if isinstance(value, (bool, str)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def json_int(**constraints: Any) -> Any:
    """An integer as JSON (and so the spec) counts one: ``7`` or ``7.0``, never ``true`` or
    ``"7"``; ``constraints`` (ge, le) sit before the check so the spec states them."""
    return Annotated[int, Strict(False), Field(**constraints), BeforeValidator(_json_integer)]


JsonInt = json_int()


#: A sampling seed fits torch's 64-bit generators (one beyond them stopped the chat engine's
#: thread for every later request: found by schemathesis) and JSON's exact integers (I-JSON,
#: RFC 7493: |n| < 2**53, what a double, and so JavaScript or the spec's own bounds, holds exactly).
SEED_RANGE: dict[str, int] = {"ge": -(2**53 - 1), "le": 2**53 - 1}

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
