"""Request ids, one log line and the request metrics per request, as plain ASGI middleware.

Plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched and a
client disconnect still reaches the route.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glm_api.metrics import UNMATCHED_ROUTE, Metrics
from glm_api.request_context import RequestFacts, current_request

log = logging.getLogger("glm_api.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else new_request_id()  # never echo arbitrary bytes
        scope.setdefault("state", {})["request_id"] = request_id
        facts = RequestFacts()
        token = current_request.set(facts)
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request.reset(token)
            elapsed = time.monotonic() - started
            # No prompt text here: only what the operator needs to trace a request.
            log.info(
                "%s %s %s %d %.1fms prompt_tokens=%d completion_tokens=%d",
                request_id, scope.get("method"), scope.get("path"), status, elapsed * 1000,
                facts.prompt_tokens, facts.completion_tokens,
            )
            if self.metrics is not None:
                # The router left the matched route in the scope: count by its template.
                route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
                self.metrics.observe_request(scope.get("method", ""), route, status, elapsed)
