"""Per-request facts gathered while a request runs, for its one access-log line.

A ContextVar (not module state): the middleware sets a fresh :class:`RequestFacts` for each
request, and code running for that request (its tasks inherit the context) adds to it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class RequestFacts:
    prompt_tokens: int = 0
    completion_tokens: int = 0


current_request: ContextVar[RequestFacts | None] = ContextVar("glm_api_request", default=None)


def record_tokens(prompt: int = 0, completion: int = 0) -> None:
    facts = current_request.get()
    if facts is not None:
        facts.prompt_tokens += prompt
        facts.completion_tokens += completion
