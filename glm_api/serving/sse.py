"""Server-sent events: JSON ``data:`` events, ``data: [DONE]`` at the end, errors in-band.

A failure after the 200 has been sent can no longer change the status, so it travels as a
``data: {"error": {...}}`` event followed by ``[DONE]``; the openai SDK raises on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse

from glm_api.errors import APIError, InternalError

log = logging.getLogger(__name__)


def dumps(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


async def _framed(events: AsyncIterator[dict], request_id: str) -> AsyncIterator[dict]:
    try:
        async for payload in events:
            yield {"data": dumps(payload)}
    except APIError as exc:
        yield {"data": dumps(exc.to_dict())}
    except Exception:
        log.exception("stream %s failed", request_id)
        yield {"data": dumps(InternalError(f"the stream failed; request id {request_id}").to_dict())}
    yield {"data": "[DONE]"}


def sse_response(events: AsyncIterator[dict], request_id: str) -> EventSourceResponse:
    # X-Accel-Buffering: tell nginx-style proxies not to hold events back.
    return EventSourceResponse(
        _framed(events, request_id), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, ping=15
    )


async def _typed(events: AsyncIterator[dict], request_id: str) -> AsyncIterator[dict]:
    try:
        async for payload in events:
            yield {"event": payload["type"], "data": dumps(payload)}
    except Exception:  # the producer renders its own failures; this is the last resort
        log.exception("stream %s failed", request_id)
        error = InternalError(f"the stream failed; request id {request_id}")
        yield {"event": "error", "data": dumps({"type": "error", "code": error.type, "message": error.message,
                                                "param": None, "sequence_number": -1})}


def typed_sse_response(events: AsyncIterator[dict], request_id: str) -> EventSourceResponse:
    """Typed events (OpenAI's Responses API): each payload's ``type`` is also its SSE ``event``
    name, and the stream ends with the last event, no ``[DONE]``."""
    return EventSourceResponse(
        _typed(events, request_id), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, ping=15
    )
