"""The one error hierarchy of glm-api, rendered as OpenAI error JSON.

Every error a client can see is an :class:`APIError`; the HTTP layer renders it as
``{"error": {"message", "type", "param", "code"}}`` with its status. Deterministic failures
are 4xx so that SDKs, which retry 429 and 5xx, do not retry them.

    APIError (500, internal_error)
    ├── BadRequestError (400, invalid_request_error)
    │   ├── ContextLengthError (400, code context_length_exceeded)
    │   └── AdapterError (400, code invalid_lora_adapter: a LoRA folder that does not fit the model)
    ├── AuthenticationError (401)
    ├── ForbiddenError (403: a route the server's settings switch off)
    ├── NotFoundError (404)
    ├── ConflictError (409: the resource is in use)
    ├── PayloadTooLargeError (413)
    ├── UnsupportedMediaTypeError (415)
    ├── RateLimitError (429, carries Retry-After)
    ├── EngineUnavailableError (503: engine dead or shutting down)
    └── InternalError (500: generic body, details only in the log)
"""

from __future__ import annotations


class APIError(Exception):
    status_code = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthError(BadRequestError):
    code = "context_length_exceeded"


class AdapterError(BadRequestError):
    """A LoRA adapter folder that cannot be applied to the chat model: at start-up the server
    refuses to start with it, at run time (``/v1/load_lora_adapter``) it is a 400."""

    code = "invalid_lora_adapter"


class AuthenticationError(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ForbiddenError(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ConflictError(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaTypeError(APIError):
    status_code = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimitError(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "server_busy"

    def __init__(self, message: str, *, retry_after: int = 1, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class EngineUnavailableError(APIError):
    status_code = 503
    type = "service_unavailable"
    code = "engine_unavailable"


class InternalError(APIError):
    """Unexpected failure; the message is generic so that no internals leak."""

    status_code = 500
    type = "internal_error"
