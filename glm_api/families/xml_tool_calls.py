"""GLM-4.5+ tool calls: ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>``.

GLM-4.5/4.6 put a newline between the parts, GLM-4.7/5 write them without: whitespace between
parts is read either way. A value is written raw when it is a string and as JSON otherwise, so
it is typed from the tool's JSON schema: a parameter whose schema says string keeps its text
as is; any other value is read as JSON (and kept as text if it is not JSON). Calls stream as
they are written: a call's name once it is complete, then each argument once its value closed,
as consecutive pieces of the arguments' JSON text. Nothing the model writes is executed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from glm_api.families.base import ParsedOutput, ToolCall, ToolCallPart
from glm_api.families.reasoning import partial_prefix_len

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")
_ARGUMENT = re.compile(
    re.escape(KEY_OPEN) + r"(.*?)" + re.escape(KEY_CLOSE) + r"\s*" + re.escape(VALUE_OPEN) + r"(.*?)"
    + re.escape(VALUE_CLOSE) + r"\s*",
    re.DOTALL,
)


def string_parameters(tools: list[dict[str, Any]] | None) -> dict[str, set[str]]:
    """For each tool name, the parameters whose values are strings (written raw)."""
    out: dict[str, set[str]] = {}
    for tool in tools or []:
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        properties = (function.get("parameters") or {}).get("properties") or {}
        out[function["name"]] = {k for k, v in properties.items() if isinstance(v, dict) and is_string_schema(v)}
    return out


def is_string_schema(schema: dict[str, Any]) -> bool:
    """Whether values of ``schema`` are strings only (null aside): written raw, not as JSON."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return bool(kinds) and all(k == "string" for k in kinds)
    if kind is not None:
        return kind == "string"
    if "enum" in schema:
        return all(isinstance(v, str) for v in schema["enum"])
    if "const" in schema:
        return isinstance(schema["const"], str)
    branches = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(branches, list) and branches:
        typed = [b for b in branches if isinstance(b, dict) and b.get("type") != "null"]
        return bool(typed) and all(is_string_schema(b) for b in typed)
    return False


def typed_value(raw: str, is_string: bool) -> Any:
    if is_string:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # not JSON after all: the text the model wrote, rather than nothing


class XmlToolParser:
    """:class:`~glm_api.families.base.OutputParser` (and ``StreamingToolParser``) for GLM-4.5+.

    Text outside calls is content; text that could still open a call is held back, as is
    whitespace before a call (dropped when a call follows). A block whose name is not a
    function name is given back as content, verbatim. A call cut off (``max_tokens``) counts
    with the arguments that were complete once its name was; cut before that, it is content.
    """

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self._strings = string_parameters(tools)
        self._pending = ""  # raw text not yet resolved
        self._held_space = ""
        self._content: list[str] = []
        self._calls: list[tuple[str, list[str]]] = []  # name, argument pieces
        self._parts: list[ToolCallPart] = []
        self._in_call = False
        self._name: str | None = None  # of the open call, once complete

    # -- content --------------------------------------------------------------------------
    def _emit(self, text: str, out: list[str]) -> None:
        stripped = text.rstrip()
        if stripped:
            out.append(self._held_space + stripped)
            self._held_space = text[len(stripped) :]
        else:
            self._held_space += text

    # -- calls ----------------------------------------------------------------------------
    def _start_call(self, name: str) -> None:
        self._name = name
        self._calls.append((name, []))
        self._parts.append(ToolCallPart(len(self._calls) - 1, name=name))
        self._held_space = ""

    def _add_argument(self, key: str, raw: str) -> None:
        name, pieces = self._calls[-1]
        key = key.strip()
        value = typed_value(raw, key in self._strings.get(name, set()))
        piece = ("{" if not pieces else ", ") + json.dumps(key, ensure_ascii=False) + ": "
        piece += json.dumps(value, ensure_ascii=False)
        pieces.append(piece)
        self._parts.append(ToolCallPart(len(self._calls) - 1, arguments=piece))

    def _end_call(self) -> None:
        _, pieces = self._calls[-1]
        piece = "}" if pieces else "{}"
        pieces.append(piece)
        self._parts.append(ToolCallPart(len(self._calls) - 1, arguments=piece))
        self._name, self._in_call = None, False

    def _call_step(self, out: list[str]) -> bool:
        """Advance inside a call; False when more text is needed."""
        if self._name is None:  # the name runs up to the first argument or the end of the call
            ends = [i for i in (self._pending.find(KEY_OPEN), self._pending.find(CALL_CLOSE)) if i >= 0]
            if not ends:
                return False
            name = self._pending[: min(ends)].strip()
            if not _NAME.fullmatch(name):  # not a call after all: the client sees the text
                self._emit(CALL_OPEN + self._pending[: min(ends)], out)
                self._pending = self._pending[min(ends) :]
                self._in_call = False
                return True
            self._start_call(name)
            self._pending = self._pending[min(ends) :]
            return True
        if VALUE_CLOSE not in self._pending and CALL_CLOSE not in self._pending:
            return False  # a value still being written (a long one: no rescan of all of it)
        stripped = self._pending.lstrip()
        if stripped.startswith(CALL_CLOSE):
            self._pending = stripped[len(CALL_CLOSE) :]
            self._end_call()
            return True
        match = _ARGUMENT.match(stripped)
        if match is None:  # an argument still being written
            return False
        self._add_argument(match.group(1), match.group(2))
        self._pending = stripped[match.end() :]
        return True

    def feed(self, delta: str) -> str:
        self._pending += delta
        out: list[str] = []
        while True:
            if self._in_call:
                if not self._call_step(out):
                    break
                continue
            start = self._pending.find(CALL_OPEN)
            if start >= 0:
                self._emit(self._pending[:start], out)
                self._pending = self._pending[start + len(CALL_OPEN) :]
                self._in_call = True
                continue
            keep = partial_prefix_len(self._pending, CALL_OPEN)
            cut = len(self._pending) - keep
            self._emit(self._pending[:cut], out)
            self._pending = self._pending[cut:]
            break
        text = "".join(out)
        self._content.append(text)
        return text

    def take_tool_parts(self) -> list[ToolCallPart]:
        parts, self._parts = self._parts, []
        return parts

    def finish(self) -> ParsedOutput:
        tail: list[str] = []
        if self._in_call:
            if self._name is None:  # cut before the name was complete: it was text
                self._emit(CALL_OPEN + self._pending, tail)
                self._in_call = False
            else:  # cut inside its arguments: keep the complete ones
                self._end_call()
        else:
            self._emit(self._pending, tail)
        self._pending = ""
        content = "".join(self._content) + "".join(tail)
        if not self._calls:
            content += self._held_space  # plain text keeps its trailing whitespace
        calls = [ToolCall(name, "".join(pieces)) for name, pieces in self._calls]
        return ParsedOutput(content=content, tool_calls=calls)
