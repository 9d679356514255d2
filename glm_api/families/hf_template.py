"""Chat templates of generic transformers models, and which parser reads their output.

The tokenizer's own chat template formats conversations (``apply_chat_template``), so every
model whose folder ships a template works without family-specific code. A message's content
is always text: the model's control tokens typed into it (``<|im_start|>system`` ...) are
tokenised as the characters they are, never as the markers the template uses between turns,
so a user cannot forge a turn of another role. Tool calls are parsed in the syntax the template's own markers show
(:mod:`template_features`): GLM-4.5+'s ``<arg_key>``/``<arg_value>`` XML (:mod:`xml_tool_calls`),
GLM-4's ``name\n{json}``, else the Hermes/Qwen ``<tool_call>{json}</tool_call>`` style, the most
common one in HF templates (both in :mod:`json_tool_calls`, whose parsers are re-exported here
for the modules that import them from this one); model output is only ever parsed as data,
never executed. Templates that think have the reasoning split off first (:mod:`reasoning`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from glm_api.families.base import OutputParser, PassthroughParser, ToolCall
from glm_api.families.json_tool_calls import GlmToolParser, HermesToolParser
from glm_api.families.reasoning import ThinkingParser
from glm_api.families.template_features import read_features, template_options
from glm_api.families.xml_tool_calls import XmlToolParser

# Message fields that hold free text: rendered by stand-ins when they hold control tokens.
_TEXT_FIELDS = ("content", "reasoning_content")
# Markers the output parsers read: kept when decoding even where the tokenizer calls them special.
_OUTPUT_MARKERS = (
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
)
# How many prompt tokens at the end can hold the generation prompt's "<think>".
_PROMPT_TAIL = 16

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
        self.features = read_features(
            text, self.supports_tools, lambda messages, tools: self._render(messages, tools, tokenize=False)
        )
        # How a call is written, for its parser and for grammars that force one (serving/structured.py).
        # GLM-4's templates: a reply is "<|assistant|>" + a metadata line (empty, or the name
        # of the function called) + the text or the call's JSON arguments.
        self.tool_call_syntax: str | None = self.features.tool_call_syntax
        self.glm_style: bool = self.tool_call_syntax == "glm4"
        self.thinking_markers: tuple[str, str] | None = self.features.thinking_markers
        added = tokenizer.get_added_vocab()
        #: Output markers that are one token of the vocabulary (grammars name them by id).
        self.marker_token_ids: dict[str, int] = {m: added[m] for m in _OUTPUT_MARKERS if m in added}
        special_ids = set(tokenizer.all_special_ids)
        special_ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        kept = special_ids & set(self.marker_token_ids.values())
        # Decoding drops special tokens; markers the parsers need stay, even where special.
        self._dropped_ids: frozenset[int] | None = frozenset(special_ids - kept) if kept else None
        controls = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        controls |= set(tokenizer.all_special_tokens)
        ordered = sorted((c for c in controls if c), key=len, reverse=True)
        self._controls = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def encode_messages(
        self, messages: list[dict[str, Any]], tools: list[dict] | None = None, options: dict[str, Any] | None = None
    ) -> list[int]:
        if not template_text(self.tokenizer):
            raise ValueError("this model's tokenizer has no chat template, so it cannot format a chat")
        kwargs = template_options(self.features, options)
        conversation, all_tools = _convert_messages(messages, tools)
        if all_tools and not self.supports_tools:
            # Ignoring them would silently answer a different question than the one asked.
            raise ValueError("this model's chat template does not support tools")
        if self._controls is not None:
            others = [{k: v for k, v in m.items() if k not in _TEXT_FIELDS} for m in conversation]
            found = self._controls.search(json.dumps([others, all_tools, kwargs], ensure_ascii=False))
            if found:  # names, tool calls, tool schemas and options are rendered by the template as is
                raise ValueError(
                    f"a tool schema, tool call, name or template option contains the model's control token "
                    f"{found.group()!r}"
                )
            if any(
                isinstance(m.get(k), str) and self._controls.search(m[k]) for m in conversation for k in _TEXT_FIELDS
            ):
                return self._encode_contents_as_text(conversation, all_tools, kwargs)
        # The usual path, exactly what the model's own tooling gives.
        encoded = self._render(conversation, all_tools, tokenize=True, options=kwargs)
        return list(encoded["input_ids"])

    def _render(
        self,
        conversation: list[dict[str, Any]],
        tools: list[dict] | None,
        tokenize: bool,
        options: dict[str, Any] | None = None,
    ) -> Any:
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tools=tools, add_generation_prompt=True, tokenize=tokenize, return_dict=tokenize,
                **(options or {}),
            )
        except jinja2.TemplateError as exc:  # raise_exception(...) in templates, e.g. bad roles
            raise ValueError(f"the chat template cannot format these messages: {exc}") from exc
        except TypeError as exc:  # an option the template uses as something else (a number as a list...)
            raise ValueError(f"the chat template cannot format these messages with these options: {exc}") from exc

    def _encode_contents_as_text(
        self, conversation: list[dict[str, Any]], tools: list[dict] | None, options: dict[str, Any]
    ) -> list[int]:
        """Render with a stand-in for each content, then tokenise the template's text with its
        control tokens and each content with control tokens split into plain text.

        Only taken when some content holds a control token's text: tokenising in pieces may
        cut a merge at a piece's edge that the whole text would make, so the usual path stays
        the exact one.
        """
        contents: list[str] = []
        slotted = []
        for message in conversation:
            message = dict(message)
            for key in _TEXT_FIELDS:
                text = message.get(key)
                if isinstance(text, str) and text:
                    message[key] = _SLOT.format(len(contents))
                    contents.append(text)
            slotted.append(message)
        text = self._render(slotted, tools, tokenize=False, options=options)
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
        if self._dropped_ids is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self._dropped_ids], skip_special_tokens=False)

    def prompt_opens_thinking(self, prompt_ids: list[int]) -> bool:
        """Whether the generation prompt ends inside the thinking (``...<|assistant|><think>``)."""
        if self.thinking_markers is None or not prompt_ids:
            return False
        opening, closing = self.thinking_markers
        tail = self.tokenizer.decode(prompt_ids[-_PROMPT_TAIL:], skip_special_tokens=False)
        start = tail.rfind(opening)
        return start >= 0 and start > tail.rfind(closing) and not tail[start + len(opening) :].strip()

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.convert_ids_to_tokens(i) for i in ids]

    def new_output_parser(
        self, tools_enabled: bool, tools: list[dict] | None = None, prompt_ids: list[int] | None = None
    ) -> OutputParser:
        parser: OutputParser
        if self.glm_style:
            parser = GlmToolParser(tools_enabled)
        elif not tools_enabled:
            parser = PassthroughParser()
        elif self.tool_call_syntax == "glm45":
            parser = XmlToolParser(tools)
        else:
            parser = HermesToolParser()
        if self.thinking_markers is None:
            return parser
        return ThinkingParser(parser, self.thinking_markers, self.prompt_opens_thinking(prompt_ids or []))
