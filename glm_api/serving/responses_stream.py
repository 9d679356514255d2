"""/v1/responses with ``stream: true``: an admitted response's answer as OpenAI's typed events.

The events come in OpenAI's order: ``response.created``, ``response.in_progress``, then each
output item as its text arrives (added, its text's deltas, done: reasoning, then the message,
then the function calls whole), then ``response.completed`` (``response.incomplete`` when
max_output_tokens cut it). A failure after the 200 is an ``error`` event, then
``response.failed``.

Apart from :mod:`glm_api.serving.responses` (admission, the whole answer, stored responses),
which it builds on and which does not import it: the router imports :func:`response_stream`
from here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from glm_api.errors import APIError, BadRequestError, InternalError, RateLimitError
from glm_api.families.base import ToolCall
from glm_api.protocol.responses import FunctionCallOut, OutputMessage, OutputText, ReasoningOut, ResponseErrorInfo
from glm_api.protocol.responses_request import ReasoningText
from glm_api.serving.openai_chat import final_answer, new_tool_call_id
from glm_api.serving.responses import ResponsePlan, finished_response, keep_response, new_id, reasoning_of

log = logging.getLogger(__name__)


class _Sequence:
    """Numbers the events of one stream (``sequence_number``, from 0)."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self, type_: str, **fields: Any) -> dict:
        event = {"type": type_, "sequence_number": self.next}
        self.next += 1
        for key, value in fields.items():
            event[key] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        return event


class _StreamedOutput:
    """Output items as their text arrives: an item is added on its first text and done before
    the next one is added (reasoning, then the message, then the calls, whole)."""

    def __init__(self, event: _Sequence) -> None:
        self.event = event
        self.items: list = []  # done items, in output order
        self._open: tuple[str, str, list[str]] | None = None  # (kind, item id, texts)

    def delta(self, kind: str, text: str) -> list[dict]:
        """``kind``: "reasoning" or "message"."""
        events = self._close("completed") if self._open is not None and self._open[0] != kind else []
        index = len(self.items)
        if self._open is None:
            item_id = new_id("rs" if kind == "reasoning" else "msg")
            self._open = (kind, item_id, [])
            if kind == "reasoning":
                events.append(self.event("response.output_item.added", output_index=index,
                                         item=ReasoningOut(id=item_id, status="in_progress")))
            else:
                events.append(self.event("response.output_item.added", output_index=index,
                                         item=OutputMessage(id=item_id, status="in_progress", content=[])))
                events.append(self.event("response.content_part.added", item_id=item_id, output_index=index,
                                         content_index=0, part=OutputText(text="")))
        _, item_id, texts = self._open
        texts.append(text)
        if kind == "reasoning":
            events.append(self.event("response.reasoning_text.delta", item_id=item_id, output_index=index,
                                     content_index=0, delta=text))
        else:
            events.append(self.event("response.output_text.delta", item_id=item_id, output_index=index,
                                     content_index=0, delta=text, logprobs=[]))
        return events

    def _close(self, status: str) -> list[dict]:
        if self._open is None:
            return []
        kind, item_id, texts = self._open
        self._open = None
        text, index = "".join(texts), len(self.items)
        if kind == "reasoning":
            item = ReasoningOut(id=item_id, content=[ReasoningText(text=text)], status=status)
            events = [self.event("response.reasoning_text.done", item_id=item_id, output_index=index,
                                 content_index=0, text=text)]
        else:
            part = OutputText(text=text)
            item = OutputMessage(id=item_id, status=status, content=[part])
            events = [
                self.event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                           text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                           part=part),
            ]
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        return events

    def finish(self, status: str, calls: list[ToolCall]) -> list[dict]:
        """Close the open item; a message even when empty unless the model only called tools;
        then each call: added, its arguments (one delta), done."""
        has_message = (self._open is not None and self._open[0] == "message") or any(
            isinstance(item, OutputMessage) for item in self.items
        )
        events = [] if has_message or calls else self.delta("message", "")
        events += self._close(status)
        for call in calls:
            index = len(self.items)
            item = FunctionCallOut(id=new_id("fc"), call_id=call.id or new_tool_call_id(), name=call.name,
                                   arguments="", status="in_progress")
            events.append(self.event("response.output_item.added", output_index=index, item=item))
            events.append(self.event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                                     delta=call.arguments))
            events.append(self.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                     name=call.name, arguments=call.arguments))
            item = item.model_copy(update={"arguments": call.arguments, "status": "completed"})
            events.append(self.event("response.output_item.done", output_index=index, item=item))
            self.items.append(item)
        return events


async def response_stream(plan: ResponsePlan) -> AsyncIterator[dict]:
    """``response.created``, ``response.in_progress``, the items' events as text arrives, then
    ``response.completed`` (or ``response.incomplete`` when max_output_tokens cut it). A failure
    after the 200 is an ``error`` event, then ``response.failed``."""
    event = _Sequence()
    started = plan.response("in_progress", [])
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    out = _StreamedOutput(event)
    texts: list[str] = []
    try:
        async for chunk in plan.chat.run.events():
            reasoning = reasoning_of(chunk)
            if reasoning:
                for e in out.delta("reasoning", reasoning):
                    yield e
            if chunk.text:
                texts.append(chunk.text)
                if not plan.chat.forced_tool:  # a forced call's JSON is not shown as text
                    for e in out.delta("message", chunk.text):
                        yield e
            if chunk.finish_reason is None:
                continue
            content, finish_reason, calls = final_answer(plan.chat, "".join(texts), chunk.finish_reason,
                                                         chunk.tool_calls)
            if plan.chat.forced_tool and content:  # cut before the call closed: show what was written
                for e in out.delta("message", content):
                    yield e
            status = "incomplete" if finish_reason == "length" else "completed"
            for e in out.finish(status, calls):
                yield e
            response = finished_response(plan, out.items, finish_reason, chunk.completion_tokens)
            await keep_response(plan, response)
            yield event(f"response.{response.status}", response=response)
    except Exception as exc:
        error = exc if isinstance(exc, APIError) else InternalError(f"the response failed; request id {plan.id}")
        if not isinstance(exc, APIError):
            log.exception("response %s failed", plan.id)
        yield event("error", code=error.code or error.type, message=error.message, param=error.param)
        failed = plan.response("failed", out.items, error=ResponseErrorInfo(code=_failure_code(error),
                                                                            message=error.message))
        yield event("response.failed", response=failed)


def _failure_code(error: APIError) -> str:
    """OpenAI's ``response.error.code`` for one of our errors."""
    if isinstance(error, RateLimitError):
        return "rate_limit_exceeded"
    return "invalid_prompt" if isinstance(error, BadRequestError) else "server_error"
