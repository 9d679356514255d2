"""Tool calls whose arguments are JSON, in the two syntaxes chat templates use for them.

Hermes/Qwen's ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, the most
common syntax in transformers chat templates (:class:`HermesToolParser`), and GLM-4's metadata
line ``name\n{json}`` (:class:`GlmToolParser`, shared by glm-4-9b-chat-hf's template and
:mod:`glm4_chat`). GLM-4.5+'s ``<arg_key>``/``<arg_value>`` syntax is in :mod:`xml_tool_calls`.
Each parser streams the content and holds back text that could still become a call; model
output is only ever parsed as data, never executed.
"""

from __future__ import annotations

import json
import re

from glm_api.families.base import ParsedOutput, ToolCall
from glm_api.families.reasoning import partial_prefix_len

_TOOL_OPEN = "<tool_call>"
_TOOL_CLOSE = "</tool_call>"


def _parse_tool_call(body: str) -> ToolCall | None:
    """``{"name": ..., "arguments": {...}}`` -> ToolCall; None for anything else (never eval)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models double-encode the arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=obj["name"], arguments=json.dumps(arguments, ensure_ascii=False))


class HermesToolParser:
    """Streams content and collects ``<tool_call>{json}</tool_call>`` blocks (Hermes, Qwen).

    Text is held back while it could be the start of ``<tool_call>`` and while it is only
    whitespace (which usually precedes a call, and is dropped when calls follow). A block whose
    JSON does not parse is given back as content, verbatim.
    """

    def __init__(self) -> None:
        self._pending = ""  # raw text not yet resolved
        self._held_space = ""  # whitespace after the last emitted content
        self._in_call = False
        self._content: list[str] = []
        self._calls: list[ToolCall] = []

    def _emit(self, text: str, out: list[str]) -> None:
        stripped = text.rstrip()
        if stripped:
            out.append(self._held_space + stripped)
            self._held_space = text[len(stripped) :]
        else:
            self._held_space += text

    def _close_block(self, body: str, out: list[str]) -> None:
        call = _parse_tool_call(body)
        if call is None:
            self._emit(_TOOL_OPEN + body + _TOOL_CLOSE, out)
        else:
            self._calls.append(call)
            self._held_space = ""

    def feed(self, delta: str) -> str:
        self._pending += delta
        out: list[str] = []
        while True:
            if self._in_call:
                end = self._pending.find(_TOOL_CLOSE)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(_TOOL_CLOSE) :]
                self._in_call = False
                self._close_block(body, out)
                continue
            start = self._pending.find(_TOOL_OPEN)
            if start >= 0:
                self._emit(self._pending[:start], out)
                self._pending = self._pending[start + len(_TOOL_OPEN) :]
                self._in_call = True
                continue
            keep = partial_prefix_len(self._pending, _TOOL_OPEN)
            cut = len(self._pending) - keep
            self._emit(self._pending[:cut], out)
            self._pending = self._pending[cut:]
            break
        text = "".join(out)
        self._content.append(text)
        return text

    def finish(self) -> ParsedOutput:
        tail: list[str] = []
        if self._in_call:
            # A block cut off before </tool_call> counts if its JSON is complete.
            call = _parse_tool_call(self._pending)
            if call is None:
                self._emit(_TOOL_OPEN + self._pending, tail)
            else:
                self._calls.append(call)
                self._held_space = ""
        else:
            self._emit(self._pending, tail)
        self._pending, self._in_call = "", False
        content = "".join(self._content) + "".join(tail)
        if not self._calls:
            content += self._held_space  # plain text keeps its trailing whitespace
        return ParsedOutput(content=content, tool_calls=list(self._calls))


_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class GlmToolParser:
    """GLM-4 output: a metadata line, then the reply (empty metadata) or a call's arguments.

    ``get_weather\n{"city": "Beijing"}`` is a call of get_weather (with tools enabled); an
    empty first line is dropped from a plain reply, as ChatGLM3's parser does. The first line
    is held back until it is complete; a call's arguments until the end. Arguments that are
    not a JSON object turn the whole output back into text.
    """

    def __init__(self, tools_enabled: bool) -> None:
        self.tools_enabled = tools_enabled
        self._head: str | None = ""  # the first line while it is incomplete; None once decided
        self._call_name: str | None = None
        self._body: list[str] = []  # a call's arguments, or the plain reply so far

    def feed(self, delta: str) -> str:
        if self._head is None:
            self._body.append(delta)
            return "" if self._call_name is not None else delta
        self._head += delta
        metadata, newline, rest = self._head.partition("\n")
        if not newline:
            name = metadata.strip()
            if name and not (self.tools_enabled and _FUNCTION_NAME.fullmatch(name)):
                # Text from the first character on (no metadata line): stream it now.
                self._head = None
                self._body.append(metadata)
                return metadata
            return ""
        self._head = None
        if self.tools_enabled and _FUNCTION_NAME.fullmatch(metadata.strip()):
            self._call_name = metadata.strip()
            self._body.append(rest)
            return ""
        text = rest if not metadata.strip() else f"{metadata}\n{rest}"
        self._body.append(text)
        return text

    def finish(self) -> ParsedOutput:
        if self._head is not None:  # no newline at all: a one-line reply
            text, self._head = self._head, None
            return ParsedOutput(content=text)
        body = "".join(self._body)
        if self._call_name is None:
            return ParsedOutput(content=body)
        try:
            arguments = json.loads(body)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            return ParsedOutput(content=f"{self._call_name}\n{body}")
        call = ToolCall(self._call_name, json.dumps(arguments, ensure_ascii=False))
        return ParsedOutput(content="", tool_calls=[call])
