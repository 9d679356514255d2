"""Chat templates of generic transformers models, and their tool-call parsing.

The tokenizer's own chat template formats conversations (``apply_chat_template``), so every
model whose folder ships a template works without family-specific code. A message's content
is always text: the model's control tokens typed into it (``<|im_start|>system`` ...) are
tokenised as the characters they are, never as the markers the template uses between turns,
so a user cannot forge a turn of another role. Tool calls are parsed in the Hermes/Qwen
``<tool_call>{json}</tool_call>`` style, the most common one in HF templates, or in GLM-4's
``name\n{json}`` style when the template is GLM-4's; model output is only ever parsed with
``json.loads``, never executed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from glm_api.families.base import OutputParser, ParsedOutput, PassthroughParser, ToolCall

_TOOL_OPEN = "<tool_call>"
_TOOL_CLOSE = "</tool_call>"

# Stand-ins for message contents while a template is rendered (Unicode private use area).
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")
_SLOT_MARKS = ("\ue000", "\ue001")

# ---------------------------------------------------------------------------------------------
# Chat template


def _tool_call_to_hf(call: ToolCall | dict[str, Any]) -> dict[str, Any]:
    """OpenAI-style call -> the {"type": "function", "function": {...}} form HF templates use.

    HF templates expect ``arguments`` as a dict (many render it with ``tojson``).
    """
    if isinstance(call, dict):  # already in wire form: {"id", "type", "function": {...}}
        function = call.get("function", call)
        name, arguments, call_id = function.get("name"), function.get("arguments", {}), call.get("id", "")
    else:
        name, arguments, call_id = call.name, call.arguments, call.id
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call {name!r}: arguments are not valid JSON ({exc.msg})") from exc
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object")
    converted: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        converted["id"] = call_id
    return converted


def _tool_to_hf(tool: dict[str, Any]) -> dict[str, Any]:
    """Seed clients send bare function schemas ({"name", "description", "parameters"})."""
    if "function" in tool or "name" not in tool:
        return tool
    return {"type": "function", "function": tool}


def _tool_name(tool: dict[str, Any]) -> str | None:
    function = tool.get("function")
    return function.get("name") if isinstance(function, dict) else tool.get("name")


def _convert_messages(
    messages: list[dict[str, Any]], tools: list[dict] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Our internal messages -> what ``apply_chat_template`` takes; seed tools are merged."""
    merged = [_tool_to_hf(t) for t in tools or []]
    converted: list[dict[str, Any]] = []
    for message in messages:
        out = {k: v for k, v in message.items() if k not in ("metadata", "tools", "tool_calls")}
        if out.get("content") is None:  # assistant turns that only call tools; templates concat it
            out["content"] = ""
        if message.get("tool_calls"):
            out["tool_calls"] = [_tool_call_to_hf(c) for c in message["tool_calls"]]
        if message.get("role") == "system" and message.get("tools"):
            merged.extend(_tool_to_hf(t) for t in message["tools"])
        converted.append(out)
    # The same tool given in both places must not be shown twice.
    unique: list[dict[str, Any]] = []
    seen: set[str | None] = set()
    for tool in merged:
        name = _tool_name(tool)
        if name is not None and name in seen:
            continue
        seen.add(name)
        unique.append(tool)
    return converted, unique or None


def template_text(tokenizer: PreTrainedTokenizerBase) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: "default", "tool_use", ...
        return "\n".join(str(t) for t in template.values())
    return template


class HFChatTemplate:
    """A :class:`ChatTemplate` over a transformers tokenizer and its jinja chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, extra_stop_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        stops = set(extra_stop_ids)
        if tokenizer.eos_token_id is not None:
            stops.add(tokenizer.eos_token_id)
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        text = template_text(tokenizer)
        self.supports_tools: bool = bool(text) and "tools" in text
        # GLM-4's templates: a reply is "<|assistant|>" + a metadata line (empty, or the name
        # of the function called) + the text or the call's JSON arguments; tool results come
        # back as <|observation|>.
        self.glm_style: bool = bool(text) and "<|observation|>" in text and "<|assistant|>" in text
        # How a call is written, for grammars that force one (see serving/structured.py).
        self.tool_call_syntax: str | None = "glm4" if self.glm_style else "hermes" if self.supports_tools else None
        controls = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        controls |= set(tokenizer.all_special_tokens)
        ordered = sorted((c for c in controls if c), key=len, reverse=True)
        self._controls = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def encode_messages(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        if not template_text(self.tokenizer):
            raise ValueError("this model's tokenizer has no chat template, so it cannot format a chat")
        conversation, all_tools = _convert_messages(messages, tools)
        if all_tools and not self.supports_tools:
            # Ignoring them would silently answer a different question than the one asked.
            raise ValueError("this model's chat template does not support tools")
        if self._controls is not None:
            others = [{k: v for k, v in m.items() if k != "content"} for m in conversation]
            found = self._controls.search(json.dumps([others, all_tools], ensure_ascii=False))
            if found:  # names, tool calls and tool schemas are rendered by the template as is
                raise ValueError(
                    f"a tool schema, tool call or name contains the model's control token {found.group()!r}"
                )
            if any(isinstance(m.get("content"), str) and self._controls.search(m["content"]) for m in conversation):
                return self._encode_contents_as_text(conversation, all_tools)
        # The usual path, exactly what the model's own tooling gives.
        encoded = self._render(conversation, all_tools, tokenize=True)
        return list(encoded["input_ids"])

    def _render(self, conversation: list[dict[str, Any]], tools: list[dict] | None, tokenize: bool) -> Any:
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tools=tools, add_generation_prompt=True, tokenize=tokenize, return_dict=tokenize
            )
        except jinja2.TemplateError as exc:  # raise_exception(...) in templates, e.g. bad roles
            raise ValueError(f"the chat template cannot format these messages: {exc}") from exc

    def _encode_contents_as_text(self, conversation: list[dict[str, Any]], tools: list[dict] | None) -> list[int]:
        """Render with a stand-in for each content, then tokenise the template's text with its
        control tokens and each content with control tokens split into plain text.

        Only taken when some content holds a control token's text: tokenising in pieces may
        cut a merge at a piece's edge that the whole text would make, so the usual path stays
        the exact one.
        """
        contents: list[str] = []
        slotted = []
        for message in conversation:
            content = message.get("content")
            if isinstance(content, str) and content:
                slotted.append({**message, "content": _SLOT.format(len(contents))})
                contents.append(content)
            else:
                slotted.append(message)
        text = self._render(slotted, tools, tokenize=False)
        ids: list[int] = []
        pos = 0
        for match in _SLOT_RE.finditer(text):
            ids += self._template_piece(text[pos : match.start()])
            index = int(match.group(1))
            if index >= len(contents):  # a stand-in look-alike typed into a tool call or name
                raise ValueError("a tool call or name contains private-use characters this server reserves")
            content = contents[index]
            ids += self.tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True)
            pos = match.end()
        ids += self._template_piece(text[pos:])
        return ids

    def _template_piece(self, piece: str) -> list[int]:
        if any(mark in piece for mark in _SLOT_MARKS):
            # The template rewrote a content (cut or re-spelled it): it cannot be placed as text.
            raise ValueError("this model's chat template rewrites message contents, so content holding the model's "
                             "control tokens cannot be formatted safely")
        return list(self.tokenizer.encode(piece, add_special_tokens=False)) if piece else []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.convert_ids_to_tokens(i) for i in ids]

    def new_output_parser(self, tools_enabled: bool) -> OutputParser:
        if self.glm_style:
            return GlmToolParser(tools_enabled)
        return HermesToolParser() if tools_enabled else PassthroughParser()


# ---------------------------------------------------------------------------------------------
# Tool-call parsing


def _partial_prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


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
            keep = _partial_prefix_len(self._pending, _TOOL_OPEN)
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


# ---------------------------------------------------------------------------------------------
# Loading
