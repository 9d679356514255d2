"""One batch line: parsed from its JSONL text, run through the very serving calls of the
interactive ``/v1`` routes, and turned into an output or error line in OpenAI's format.

Shared by the Batch API's runner (:mod:`glm_api.batch_runner`) and the offline
``python -m glm_api batch`` command, so a line gives the same answer in both and over HTTP.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from glm_api.errors import APIError, BadRequestError, EngineUnavailableError, RateLimitError
from glm_api.protocol.batch import BATCH_ENDPOINTS, BatchLine
from glm_api.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from glm_api.registry import ModelRegistry
from glm_api.serving import openai_chat, openai_completions, openai_embeddings
from glm_api.state import Services

#: The engine's priority of batch lines: queued behind interactive requests, preempted first.
BATCH_PRIORITY = 1

REQUESTS = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}


class RetryLater(Exception):
    """The engine could not take the line now (queue full, shutting down): leave it pending."""


@dataclass
class ParsedLine:
    line: int  # 1-based, as editors count
    custom_id: str | None
    request: dict[str, Any] | None  # the line's JSON when it is valid
    error: str | None = None  # why it is not


def validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {exc.error_count() - 1} more error(s))" if exc.error_count() > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}" if where else f"{first.get('msg')}{more}"


def parse_line(number: int, text: str, endpoint: str | None) -> ParsedLine:
    """Check a line's envelope (custom_id, method, url); its body is checked when it runs,
    by the same models as the interactive route's. ``endpoint`` None: any batch endpoint."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return ParsedLine(number, None, None, f"not valid JSON: {exc.msg} (column {exc.colno})")
    custom_id = raw.get("custom_id") if isinstance(raw, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) else None
    try:
        line = BatchLine.model_validate(raw)
    except ValidationError as exc:
        return ParsedLine(number, custom_id, None, validation_message(exc))
    if endpoint is None and line.url not in BATCH_ENDPOINTS:
        return ParsedLine(number, custom_id, None, f"url is {line.url!r}; one of {', '.join(BATCH_ENDPOINTS)}")
    if endpoint is not None and line.url != endpoint:
        return ParsedLine(number, custom_id, None, f"url is {line.url!r}; this batch's endpoint is {endpoint!r}")
    return ParsedLine(number, line.custom_id, line.model_dump())


def parse_lines(content: bytes, endpoint: str | None) -> list[ParsedLine]:
    """Every non-blank line of a batch file; a repeated custom_id is that later line's error."""
    seen: set[str] = set()
    parsed = []
    for number, text in enumerate(content.decode("utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        line = parse_line(number, text, endpoint)
        if line.request is not None and line.custom_id in seen:
            line = ParsedLine(number, line.custom_id, None, f"custom_id {line.custom_id!r} is repeated")
        if line.custom_id is not None:
            seen.add(line.custom_id)
        parsed.append(line)
    return parsed


def looks_like_jsonl(content: bytes) -> str | None:
    """Why ``content`` is not a JSONL file at all (None when it is): UTF-8, at least one line,
    and its first non-blank line a JSON object. Later bad lines are those lines' errors."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the file is not UTF-8 text (byte {exc.start})"
    first = next((line for line in text.splitlines() if line.strip()), None)
    if first is None:
        return "the file has no lines"
    try:
        value = json.loads(first)
    except json.JSONDecodeError:
        return "the file is not JSONL: its first line is not JSON"
    if not isinstance(value, dict):
        return "the file is not JSONL: its first line is not a JSON object"
    return None


def endpoint_served(services: Services, endpoint: str) -> str | None:
    """Why ``endpoint`` cannot take a batch on this server (None when it can)."""
    if endpoint not in BATCH_ENDPOINTS:
        return f"endpoint {endpoint!r} cannot run as a batch; use one of {', '.join(BATCH_ENDPOINTS)}"
    if endpoint not in served_endpoints(services.registry):
        return f"this server loads no {'embedding' if endpoint == '/v1/embeddings' else 'chat'} model"
    return None


def served_endpoints(registry: ModelRegistry) -> list[str]:
    """The batch endpoints the loaded models serve."""
    return [e for e in BATCH_ENDPOINTS if (registry.embeddings if e == "/v1/embeddings" else registry.chat is not None)]


async def execute(services: Services, endpoint: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The response body the interactive route would send. Raises :class:`APIError` as that
    route would, :class:`RetryLater` for a refusal that is about now, not about the line."""
    try:
        req = REQUESTS[endpoint].model_validate(body)
    except ValidationError as exc:
        raise BadRequestError(validation_message(exc), code="invalid_value") from None
    if getattr(req, "stream", False):
        raise BadRequestError("stream is not supported in a batch", param="stream")
    try:
        if endpoint == "/v1/chat/completions":
            plan = await openai_chat.start_chat(services.chat, req, request_id, priority=BATCH_PRIORITY)
            response = await openai_chat.chat_response(plan)
        elif endpoint == "/v1/completions":
            plan = await openai_completions.start_completion(services.chat, req, request_id, priority=BATCH_PRIORITY)
            response = await openai_completions.completion_response(plan)
        else:
            response = await openai_embeddings.create_embeddings(services.embeddings, req)
    except (RateLimitError, EngineUnavailableError) as exc:
        raise RetryLater(exc.message) from None
    return response.model_dump(mode="json")


def output_line(custom_id: str | None, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(number: int, custom_id: str | None, error: APIError | str, request_id: str | None = None) -> dict[str, Any]:
    """An error file line. A request the endpoint refused carries its HTTP answer in
    ``response`` (as OpenAI's do); every error line names the input line in ``error.line``."""
    if isinstance(error, str):
        error = BadRequestError(error, code="invalid_request")
    response = None
    if request_id is not None:
        response = {"status_code": error.status_code, "request_id": request_id, "body": error.to_dict()}
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": response,
        "error": {"code": error.code or error.type, "message": f"line {number}: {error.message}", "line": number},
    }
