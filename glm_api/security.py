"""Access control and request-size limits, as plain ASGI middleware (streams pass untouched).

- :class:`ApiKeyMiddleware`: with keys configured, every route but the probes needs
  ``Authorization: Bearer <key>`` (or Azure-style ``api-key: <key>``); keys are compared in
  constant time and never logged.
- :class:`BodyLimitMiddleware`: a body over the limit is answered 413 before anything parses
  it, whether or not the client announced its length.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glm_api.errors import APIError, AuthenticationError, BadRequestError, PayloadTooLargeError

#: Probes stay open so orchestrators can check the process without a key.
OPEN_PATHS = frozenset({"/health", "/ready"})


async def send_error(send: Send, error: APIError) -> None:
    body = json.dumps(error.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(
        self, app: ASGIApp, keys: Iterable[str], open_paths: Iterable[str] = (), open_prefixes: Iterable[str] = ()
    ) -> None:
        """``open_paths`` / ``open_prefixes``: more public paths beside the probes (the playground's
        page and static files, which hold no secrets)."""
        self.app = app
        self._keys = [k.encode() for k in keys if k]
        self._open_paths = OPEN_PATHS | frozenset(open_paths)
        self._open_prefixes = tuple(open_prefixes)

    def _is_open(self, path: str) -> bool:
        return path in self._open_paths or (bool(self._open_prefixes) and path.startswith(self._open_prefixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or self._is_open(scope.get("path", "")) or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = _bearer(headers.get(b"authorization", b"")) or headers.get(b"api-key", b"").strip()
        if not given:
            await send_error(send, AuthenticationError(
                "no API key: send it as 'Authorization: Bearer <key>' (or an 'api-key' header)", code="missing_api_key"
            ))
            return
        # Compare against every key so the time taken does not tell which one nearly matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            await send_error(send, AuthenticationError("the API key is not valid"))
            return
        await self.app(scope, receive, send)


def _bearer(value: bytes) -> bytes:
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def request_api_key(scope: Scope) -> str | None:
    """The key a request presented (checked by :class:`ApiKeyMiddleware` when keys are on)."""
    headers = dict(scope.get("headers") or [])
    given = _bearer(headers.get(b"authorization", b"")) or headers.get(b"api-key", b"").strip()
    return given.decode("latin-1") if given else None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        """``path_limits``: other limits for exact paths (file uploads)."""
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await send_error(send, BadRequestError("the Content-Length header is not a number"))
            return
        if declared is not None and int(declared) > limit:
            await send_error(send, self._too_large(limit))
            return

        # Read the body here, bounded, then replay it: the app never sees more than the limit.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending everything: nobody to answer
            size += len(message.get("body", b""))
            if size > limit:
                await send_error(send, self._too_large(limit))
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnects reach the app as usual

        await self.app(scope, replay, send)

    def _too_large(self, limit: int) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"the request body is larger than {limit} bytes")
