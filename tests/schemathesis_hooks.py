"""The request rules of this server that JSON Schema cannot state, told to schemathesis
(``schemathesis.toml`` at the repository root loads this file for ``schemathesis run``).

The spec states every rule it can (``glm_api/protocol``, ``glm_api/openapi_limits.py``). The
rules here relate values that a JSON Schema cannot relate, so a request generated as valid may
break one and get a 400 the spec could not announce. Before each call, a request schemathesis
generated as valid is made to keep them; requests generated as invalid are sent as they are.

- ``/chat``: the last message is not the assistant's (there is nothing to answer).
- An assistant's tool call (a ``function_call`` input item on ``/v1/responses``) carries its
  arguments as the JSON text of an object (chat formats read them as JSON).
- A named ``tool_choice`` names one of the ``tools``.
- ``structured_outputs.json`` given as text is JSON text (the spec says so, with
  ``contentMediaType``, which generators do not read).
- ``structured_outputs.regex`` and ``.grammar`` compile (a regular expression, a Lark grammar):
  random text rarely does, and is a 400 naming the compiler's error.
- ``/score``: a list ``text_1`` of more than one text pairs with a ``text_2`` list as long.
- ``/v1/files``: a file uploaded for ``purpose: batch`` is JSONL (its first line an object).
- ``/v1/responses``: a ``previous_response_id`` names a stored response (a random one is
  OpenAI's 400 ``previous_response_not_found``), so generated requests start a conversation
  (given as ``input``, where only the earlier response would have made one). A named
  ``tool_choice`` names one of the ``tools`` there too.
- A message's ``reasoning_content`` and ``reasoning`` are one field under two names: given
  both, they are equal.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


BATCH_LINE = b'{"custom_id": "1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "hi"}}\n'


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return
    body: dict[str, Any] = case.body
    first, second = body.get("text_1"), body.get("text_2")
    if case.path.endswith("/score") and isinstance(first, list) and len(first) > 1:
        if not isinstance(second, list) or len(second) != len(first):
            body["text_1"] = first[:1]
    if case.path == "/v1/files" and body.get("purpose") == "batch":
        # Sent in place of the generated body, which stays as generated: schemathesis judges an
        # edited body holding binary data as invalid (it cannot validate binary).
        kwargs["files"] = {"file": ("batch.jsonl", BATCH_LINE), "purpose": (None, "batch")}
    if case.path == "/v1/responses" and body.get("previous_response_id") is not None:
        body["previous_response_id"] = None
        if not _starts_a_conversation(body):
            body["input"] = "Hi"
    named, offered = body.get("tool_choice"), body.get("tools")
    if case.path == "/v1/responses" and isinstance(named, dict) and isinstance(offered, list) and offered:
        named["name"] = offered[0]["name"]
    for item in body.get("input") if case.path == "/v1/responses" and isinstance(body.get("input"), list) else []:
        if isinstance(item, dict) and item.get("type") == "function_call" and not _is_json_object(item.get("arguments")):
            item["arguments"] = "{}"  # a call's arguments are the JSON text of an object, as on chat
    messages = body.get("messages")
    if isinstance(messages, list):
        if case.path == "/chat" and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages[-1]["role"] = "user"
        for message in messages:
            if isinstance(message, dict) and message.get("reasoning") is not None and message.get("reasoning_content") is not None:
                message["reasoning"] = message["reasoning_content"]
            for call in (message.get("tool_calls") or []) if isinstance(message, dict) else []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and not _is_json_object(function.get("arguments", "{}")):
                    function["arguments"] = "{}"
    structured = body.get("structured_outputs")
    if isinstance(structured, dict) and isinstance(structured.get("regex"), str):
        structured["regex"] = "[a-z]{1,8}"
    if isinstance(structured, dict) and isinstance(structured.get("grammar"), str):
        structured["grammar"] = 'start: "yes" | "no"'
    if isinstance(structured, dict) and isinstance(structured.get("json"), str):
        try:
            schema = json.loads(structured["json"])
        except ValueError:
            schema = None
        if not isinstance(schema, dict):  # serving takes a schema object (structured._schema_text)
            structured["json"] = "{}"
    choice, tools = body.get("tool_choice"), body.get("tools")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) and tools:
        choice["function"]["name"] = tools[0]["function"]["name"]


def _starts_a_conversation(body: dict[str, Any]) -> bool:
    """A /v1/responses body gives the model something to answer without an earlier response:
    the spec's rule (``protocol.responses_request._request_rules``)."""
    given = body.get("input")
    items = given if isinstance(given, list) else []
    turns = [item for item in items if not (isinstance(item, dict) and item.get("type") == "reasoning")]
    return isinstance(given, str) or bool(turns) or bool(body.get("instructions"))


def _is_json_object(text: Any) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (TypeError, ValueError):
        return False
