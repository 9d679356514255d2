"""Streaming parser for ChatGLM3's raw output (what the model writes after ``<|assistant|>``).

The output is one or more segments separated by ``<|assistant|>``; each starts with a
metadata line. Empty metadata: a plain reply (THUDM's ``process_response`` strips it).
A function name as metadata, with tools enabled: a tool call, buffered and parsed at the end.
Parsing follows THUDM's ``process_response``, except that nothing is ``eval``'d and the text
of every plain segment is kept (their version keeps only the last segment).
"""

from __future__ import annotations

from glm_api.families.base import ParsedOutput, ToolCall
from glm_api.families.chatglm3.tools import parse_tool_call

_ASSISTANT = "<|assistant|>"
# Stop tokens: the engine normally ends generation on them; if their text reaches us anyway,
# everything from there on is not part of the reply.
_STOP_TEXTS = ("<|user|>", "<|observation|>")
# An artefact of ChatGLM3's training data that THUDM's code replaces in every reply.
_TRAINING_TIME = "[[训练时间]]"
_TRAINING_TIME_VALUE = "2023年"


def _partial_suffix_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could be the start of one of ``markers``."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def _clean(text: str, complete: bool) -> str:
    """Client-visible text of one plain segment; while incomplete, a prefix of the final one."""
    text = text.lstrip()
    if not complete:
        text = text[: len(text) - _partial_suffix_len(text, (_TRAINING_TIME,))]
    return text.replace(_TRAINING_TIME, _TRAINING_TIME_VALUE).rstrip()


def render(raw: str, tools_enabled: bool, final: bool) -> ParsedOutput:
    """Content and tool calls of ``raw``. With ``final=False`` the text may still grow: the
    content is then only what is already certain (always a prefix of the final content)."""
    for stop in _STOP_TEXTS:
        raw = raw.split(stop, 1)[0]
    if not final:
        raw = raw[: len(raw) - _partial_suffix_len(raw, (_ASSISTANT, *_STOP_TEXTS))]
    segments = raw.split(_ASSISTANT)
    parts: list[str] = []
    calls: list[ToolCall] = []
    for i, segment in enumerate(segments):
        complete = final or i < len(segments) - 1
        metadata, newline, body = segment.partition("\n")
        if not newline:
            if not complete:
                break  # metadata line not finished: cannot tell a reply from a tool call yet
            parts.append(segment.strip())
        elif not metadata.strip():
            parts.append(_clean(body, complete))
        elif tools_enabled:
            if not complete:
                break  # a tool call is shown only once it is whole
            call = parse_tool_call(metadata, body)
            if call is None:
                parts.append(segment.strip())  # not a well-formed call: the client sees the text
            else:
                calls.append(call)
        else:
            parts.append(_clean(segment, complete))  # no tools: nothing to parse, show it all
        if not complete:
            break
    return ParsedOutput(content="\n".join(p for p in parts if p), tool_calls=calls)


class ChatGLM3OutputParser:
    """:class:`~glm_api.families.base.OutputParser` for one ChatGLM3 generation."""

    def __init__(self, tools_enabled: bool) -> None:
        self._tools_enabled = tools_enabled
        self._raw: list[str] = []
        self._sent = 0  # characters of content already returned by feed

    def feed(self, delta: str) -> str:
        self._raw.append(delta)
        visible = render("".join(self._raw), self._tools_enabled, final=False).content
        new = visible[self._sent :]
        self._sent = max(self._sent, len(visible))
        return new

    def finish(self) -> ParsedOutput:
        return render("".join(self._raw), self._tools_enabled, final=True)
