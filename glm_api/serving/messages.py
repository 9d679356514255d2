"""OpenAI's message contract, kept by /chat and /v1/chat/completions alike.

A message without content is a 400 that names it, as OpenAI answers: served, it would be an
empty turn the model replies to (at up to the default max_tokens). Checked while the wire
messages are translated, so before anything is templated or admitted.
"""

from __future__ import annotations

from typing import Any

from glm_api.errors import BadRequestError

#: Roles whose content OpenAI requires (and refuses as null). The deprecated "function" result
#: may be null there, so it is not listed; an assistant message needs content or tool_calls.
CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})


def check_content(index: int, role: str, content: Any, tool_calls: Any = None) -> None:
    """Refuse ``messages[index]`` when its content is missing or null where it is required."""
    if content is not None:
        return
    param = f"messages[{index}].content"
    if role == "assistant" and not tool_calls:
        raise BadRequestError(
            f"Missing required parameter: '{param}' (an assistant message needs content or tool_calls).",
            param=param,
            code="missing_required_parameter",
        )
    if role in CONTENT_REQUIRED:
        raise BadRequestError(
            f"Missing required parameter: '{param}' (a {role} message needs content).",
            param=param,
            code="missing_required_parameter",
        )
