"""Every error leaves as OpenAI error JSON: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from glm_api.errors import APIError, BadRequestError, InternalError, UnsupportedMediaTypeError

log = logging.getLogger(__name__)


def _render(error: APIError, status: int | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        error.to_dict(), status_code=status or error.status_code, headers={**error.headers(), **(headers or {})}
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def _allowed_methods(request: Request) -> str | None:
    """Every method the path takes. Starlette's 405 names the methods of the first route that
    matched the path only; a path served by two routes (GET and POST /v1/files) takes both, and
    RFC 9110's Allow lists what the resource supports."""
    methods: set[str] = set()
    for route in _routes(request.app.router.routes):
        match, _ = route.matches(request.scope)
        if match is Match.PARTIAL:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods)) or None


def _routes(routes: list[BaseRoute]) -> list[BaseRoute]:
    """The routes themselves: FastAPI (0.16x) keeps an included router as one route that holds
    the router (``original_router``); its routes carry their full paths (no include prefix here)."""
    found: list[BaseRoute] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        found.extend(_routes(inner.routes) if inner is not None else [route])
    return found


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s: %s", request.state.request_id, exc.message)
        return _render(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in content_type.lower():
            return _render(UnsupportedMediaTypeError(
                f"send the body as JSON with 'Content-Type: application/json' (got {content_type or 'none'!r})"
            ))
        message, param = _validation_message(exc)
        return _render(BadRequestError(message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = BadRequestError(str(exc.detail), code=str(exc.status_code))
        if exc.status_code == 404:
            error.code = "not_found"
        # Starlette's own headers travel on; a 405's Allow lists all the path's methods (RFC 9110).
        headers = dict(exc.headers or {})
        allowed = _allowed_methods(request) if exc.status_code == 405 else None
        if allowed:
            headers["Allow"] = allowed
        return _render(error, exc.status_code, headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "?")
        log.exception("unexpected error in request %s", request_id)
        return _render(InternalError(f"internal error; request id {request_id}"))
