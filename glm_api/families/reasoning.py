"""The thinking split: ``<think>reasoning</think>answer`` -> reasoning apart, the answer parsed.

Models that think (GLM-4.5 and later, GLM-Z1, Qwen3, DeepSeek-R1) write their reasoning between
two markers before the answer. Where the generation prompt already opened the thinking (it ends
with ``<think>``), everything up to ``</think>`` is reasoning, and an output that never closes
it is reasoning only (cut by ``max_tokens``). Otherwise the output is reasoning only when it
starts with ``<think>``: a reply that skipped its thinking is the answer, never reasoning.
The answer goes on to the family's own parser (tool calls); the reasoning is never parsed.
"""

from __future__ import annotations

from glm_api.families.base import OutputParser, ParsedOutput, StreamingToolParser, ToolCallPart


def partial_prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ThinkingParser:
    """Splits reasoning off before ``inner`` (the family's answer parser) sees the answer.

    Streams reasoning as it comes, without its leading and trailing whitespace (held back until
    more text shows it is inside); the answer starts after ``</think>`` and its leading
    whitespace. Implements :class:`~glm_api.families.base.ReasoningParser`.
    """

    def __init__(self, inner: OutputParser, markers: tuple[str, str], opened: bool) -> None:
        self._inner = inner
        self._open, self._close = markers
        # "start": may still open with <think>; "thinking"; "answer".
        self._state = "thinking" if opened else "start"
        self._pending = ""  # text not yet resolved (a possible marker, held whitespace)
        self._reasoning: list[str] = []
        self._new_reasoning: list[str] = []
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped
        self._answer_started = False  # leading whitespace of the answer is dropped

    @property
    def reasoning_open(self) -> bool:
        return self._state == "thinking"

    def feed(self, delta: str) -> str:
        self._pending += delta
        shown: list[str] = []
        while self._pending:
            if self._state == "start":
                stripped = self._pending.lstrip()
                if not stripped:
                    return ""
                if stripped.startswith(self._open):
                    self._pending = stripped[len(self._open) :]
                    self._state = "thinking"
                    continue
                if self._open.startswith(stripped):
                    return ""  # could still become <think>
                self._state = "answer"
                continue
            if self._state == "thinking":
                end = self._pending.find(self._close)
                if end >= 0:
                    self._add_reasoning(self._pending[:end].rstrip())
                    self._pending = self._pending[end + len(self._close) :]
                    self._state = "answer"
                    continue
                keep = partial_prefix_len(self._pending, self._close)
                text = self._pending[: len(self._pending) - keep]
                body = text.rstrip()  # trailing whitespace waits: it may precede </think>
                self._add_reasoning(body)
                self._pending = text[len(body) :] + self._pending[len(text) :]
                return "".join(shown)
            # answer
            text, self._pending = self._pending, ""
            if not self._answer_started:
                text = text.lstrip()
                if not text:
                    return "".join(shown)
                self._answer_started = True
            shown.append(self._inner.feed(text))
        return "".join(shown)

    def _add_reasoning(self, text: str) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        if text:
            self._reasoning.append(text)
            self._new_reasoning.append(text)

    def take_reasoning(self) -> str:
        text = "".join(self._new_reasoning)
        self._new_reasoning.clear()
        return text

    def take_tool_parts(self) -> list[ToolCallPart]:
        return self._inner.take_tool_parts() if isinstance(self._inner, StreamingToolParser) else []

    def finish(self) -> ParsedOutput:
        if self._state == "thinking":  # never closed: all of it was reasoning (the tail too)
            self._add_reasoning(self._pending.rstrip())
        elif self._state == "start" and self._pending.strip():  # a bare "<thi": the answer
            self._state = "answer"
            self._answer_started = True
            self._inner.feed(self._pending.lstrip())
        self._pending = ""
        parsed = self._inner.finish()
        return ParsedOutput(parsed.content, parsed.tool_calls, "".join(self._reasoning))
