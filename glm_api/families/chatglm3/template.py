"""ChatGLM3's conversation format (THUDM's ``build_chat_input``), as a ``ChatTemplate``.

A prompt is ``[gMASK] sop``, then per message ``<|role|>`` + encode(metadata + "\\n") +
encode(content), then ``<|assistant|>``. Every piece of text is encoded on its own, so role
markers inside text stay text and cannot be forged by a user.
"""

from __future__ import annotations

import json
from typing import Any

from glm_api.families.base import ToolCall
from glm_api.families.chatglm3.parser import ChatGLM3OutputParser
from glm_api.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from glm_api.families.chatglm3.tools import (
    DEFAULT_TOOL_SYSTEM_PROMPT,
    openai_tools_to_chatglm,
    tool_call_code,
    tools_json,
)

# OpenAI role -> ChatGLM3 and GLM-4 role ("function" is the OpenAI API's older name for "tool").
ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "observation": "observation",
    "tool": "observation",
    "function": "observation",
}


def tool_call_parts(call: Any) -> tuple[str, str]:
    """(name, JSON arguments) of a ToolCall or of an OpenAI-style tool_calls entry."""
    if isinstance(call, ToolCall):
        return call.name, call.arguments
    if isinstance(call, dict):
        function = call.get("function", call)
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            arguments = function.get("arguments") or "{}"
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            return function["name"], arguments
    raise ValueError("each assistant tool_calls entry needs a function name and JSON arguments")


def message_text(message: dict[str, Any], key: str, index: int) -> str:
    value = message.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"messages[{index}].{key} must be a string")
    return value


class ChatGLM3Template:
    """Tokenizer, prompt format, stop tokens and output parser of ChatGLM3."""

    supports_tools = True
    # Its calls are Python code (tool_call(a=1)), which no JSON grammar describes: a forced call
    # uses the family-neutral JSON form (serving/structured.py).
    tool_call_syntax = None
    thinking_markers = None

    def __init__(self, tokenizer: ChatGLM3Tokenizer) -> None:
        self.tokenizer = tokenizer
        special = tokenizer.special_ids
        self.stop_token_ids: frozenset[int] = frozenset(
            {tokenizer.eos_id, special["<|user|>"], special["<|observation|>"]}
        )
        self._prefix = tokenizer.prefix_ids

    def _message(self, role: str, metadata: str, content: str) -> list[int]:
        role_id = self.tokenizer.special_id(f"<|{role}|>")
        return [role_id, *self.tokenizer.encode(metadata + "\n"), *self.tokenizer.encode(content)]

    def encode_messages(
        self, messages: list[dict[str, Any]], tools: list[dict] | None = None, options: dict[str, Any] | None = None
    ) -> list[int]:
        """Prompt ids, ending with ``<|assistant|>``. ``tools`` (OpenAI style) are appended to
        the first system message, or to ChatGLM3's default tool prompt if there is none."""
        extra_tools = openai_tools_to_chatglm(tools) if tools else []
        ids = list(self._prefix)
        if extra_tools and not (messages and messages[0].get("role") == "system"):
            content = DEFAULT_TOOL_SYSTEM_PROMPT + "\n" + tools_json(extra_tools)
            ids += self._message("system", "", content)
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{index}] must be an object")
            role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
            if role is None:
                allowed = ", ".join(sorted(ROLES))
                raise ValueError(
                    f"messages[{index}].role {message.get('role')!r} is not supported (use one of: {allowed})"
                )
            metadata = message_text(message, "metadata", index)
            if "\n" in metadata:
                raise ValueError(f"messages[{index}].metadata must be a single line")
            content = message_text(message, "content", index)
            if role == "system":
                system_tools = message.get("tools") or []
                if not isinstance(system_tools, list):
                    raise ValueError(f"messages[{index}].tools must be a list")
                if index == 0:
                    system_tools = [*system_tools, *extra_tools]
                if system_tools:
                    content = content + "\n" + tools_json(system_tools)
            if role == "assistant" and message.get("tool_calls"):
                ids += self._assistant_tool_calls(message["tool_calls"], metadata, content, index)
            else:
                ids += self._message(role, metadata, content)
        ids.append(self.tokenizer.special_id("<|assistant|>"))
        return ids

    def _assistant_tool_calls(self, calls: Any, metadata: str, content: str, index: int) -> list[int]:
        """An assistant turn with calls, as ChatGLM3 writes it: any text first as a plain
        segment, then one ``<|assistant|>name`` segment with a tool_call code block per call."""
        if not isinstance(calls, list):
            raise ValueError(f"messages[{index}].tool_calls must be a list")
        ids: list[int] = []
        if content.strip():
            ids += self._message("assistant", metadata, content)
        for call in calls:
            name, arguments = tool_call_parts(call)
            if not name.strip() or "\n" in name:
                raise ValueError(f"messages[{index}].tool_calls: a function name must be one non-empty line")
            try:
                code = tool_call_code(arguments)
            except ValueError as exc:
                raise ValueError(f"messages[{index}].tool_calls: {exc}") from exc
            ids += self._message("assistant", name, code)
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return (self._prefix if add_special_tokens else []) + self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ids with special tokens rendered by name (``eos`` dropped): the output
        parser needs ``<|assistant|>`` to split a reply from a following tool call."""
        return self.tokenizer.decode(ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)

    def prompt_opens_thinking(self, prompt_ids: list[int]) -> bool:
        return False  # ChatGLM3 does not think

    def new_output_parser(
        self, tools_enabled: bool, tools: list[dict] | None = None, prompt_ids: list[int] | None = None
    ) -> ChatGLM3OutputParser:
        return ChatGLM3OutputParser(tools_enabled)
