"""Every error leaves as OpenAI error JSON: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
        # Starlette's own headers travel on: its 405 lists the route's methods in Allow (RFC 9110).
        return _render(error, exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "?")
        log.exception("unexpected error in request %s", request_id)
        return _render(InternalError(f"internal error; request id {request_id}"))
