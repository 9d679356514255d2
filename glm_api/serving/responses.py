"""/v1/responses over the chat engine: Responses items in, one chat completion's engine call,
Responses items out.

A request becomes a :class:`~glm_api.protocol.openai.ChatCompletionRequest` (instructions as
the system message, items as messages, function tools, ``tool_choice``, ``text.format`` as
``response_format``) and goes through the same admission as ``/v1/chat/completions``
(:func:`glm_api.serving.openai_chat.start_chat`): the same templates, tool parsing, forced
tool calls and grammars, and every deterministic failure is a 4xx before the 200.

The answer becomes output items in the order OpenAI gives them: the model's ``reasoning``
(thinking models), its ``message`` (``output_text``), then one ``function_call`` per call.
With ``store`` (the default) the response and its input items are kept
(:mod:`glm_api.serving.responses_store`); ``previous_response_id`` continues from a kept
response's input items and output.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from glm_api.errors import APIError, BadRequestError, InternalError, NotFoundError, RateLimitError
from glm_api.families.base import ToolCall
from glm_api.protocol.openai import ChatCompletionRequest
from glm_api.protocol.responses import (
    FunctionCallOut,
    FunctionCallOutputOut,
    IncompleteDetails,
    InputItemList,
    InputMessageOut,
    InputText,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ReasoningOut,
    ResponseDeleted,
    ResponseErrorInfo,
    ResponseObject,
    ResponseUsage,
)
from glm_api.protocol.responses_request import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ReasoningConfig,
    ReasoningItemIn,
    ReasoningText,
    ResponseCreateRequest,
    TextConfig,
    TextFormatText,
    join_text,
)
from glm_api.serving.chat import ChatService
from glm_api.serving.openai_chat import ChatPlan, final_answer, new_tool_call_id, start_chat
from glm_api.serving.responses_store import ResponseStore

log = logging.getLogger(__name__)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_of(result: Any) -> str:
    """The reasoning text a chat choice or event carries: the one place thinking plugs in.
    (The chat engine's thinking split gives choices and events a ``reasoning`` text; results
    without it have none.)"""
    return getattr(result, "reasoning", None) or ""


# ---------------------------------------------------------------------------------------------
# Input items -> the kept form (ids given) -> chat messages


def kept_items(req: ResponseCreateRequest) -> list[dict[str, Any]]:
    """This request's input as items in the shape ``input_items`` lists (each with an id)."""
    if isinstance(req.input, str):
        return [InputMessageOut(id=new_id("msg"), role="user", content=[InputText(text=req.input)]).model_dump()]
    out: list[dict[str, Any]] = []
    for item in req.input:
        if isinstance(item, MessageItem):
            text = join_text(item.content)
            if item.role == "assistant":
                kept = OutputMessage(id=item.id or new_id("msg"), status="completed", content=[OutputText(text=text)])
            else:
                kept = InputMessageOut(id=item.id or new_id("msg"), role=item.role, content=[InputText(text=text)])
        elif isinstance(item, FunctionCallItem):
            kept = FunctionCallOut(
                id=item.id or new_id("fc"), call_id=item.call_id, name=item.name, arguments=item.arguments,
                status="completed",
            )
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else join_text(item.output)
            kept = FunctionCallOutputOut(id=item.id or new_id("fco"), call_id=item.call_id, output=output)
        else:
            assert isinstance(item, ReasoningItemIn)
            kept = ReasoningOut(id=item.id or new_id("rs"), summary=item.summary, content=item.content or [])
        out.append(kept.model_dump())
    return out


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kept items as OpenAI chat messages: a model's function calls join its message (as one
    assistant turn with ``tool_calls``), outputs become ``tool`` messages. Reasoning of earlier
    turns is left out, as thinking chat templates leave it out."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "\n".join(part["text"] for part in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_request(req: ResponseCreateRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion that answers ``req`` (sampling extras pass through unchanged)."""
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "user": req.user,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    if req.reasoning is not None and req.reasoning.effort is not None:
        # Chat's own name for it: read by thinking templates where the chat route reads it.
        body["reasoning_effort"] = req.reasoning.effort
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})} for t in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(by_alias=True, exclude={"type"})}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    if not messages:
        raise BadRequestError("the conversation is empty: give input (or instructions)", param="input")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:  # a message the chat contract refuses (e.g. empty)
        first = exc.errors()[0]
        raise BadRequestError(f"input: {first.get('msg', 'invalid item')}", param="input") from None


# ---------------------------------------------------------------------------------------------
# Admission


@dataclass
class ResponsePlan:
    """An admitted response: its chat run and what its response object echoes."""

    chat: ChatPlan
    req: ResponseCreateRequest
    id: str
    created_at: int
    input_items: list[dict[str, Any]]  # earlier turns' items, then this request's
    owner: str
    store: ResponseStore | None  # None with store: false

    def response(self, status: str, output: list, usage: ResponseUsage | None = None, **extra: Any) -> ResponseObject:
        req = self.req
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=self.chat.run.model,
            output=output,
            usage=usage,
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            metadata=req.metadata or {},
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id,
            reasoning=req.reasoning or ReasoningConfig(),
            store=self.store is not None,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            text=TextConfig(format=(req.text.format if req.text and req.text.format else TextFormatText()),
                            verbosity=req.text.verbosity if req.text else None),
            tool_choice=req.tool_choice or "auto",
            tools=req.tools or [],
            truncation=req.truncation or "disabled",
            user=req.user,
            **extra,
        )

    def usage(self, output_tokens: int) -> ResponseUsage:
        run = self.chat.run
        return ResponseUsage(
            input_tokens=run.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=run.cached_tokens),
            output_tokens=output_tokens,
            total_tokens=run.prompt_tokens + output_tokens,
        )


async def start_response(
    service: ChatService, store: ResponseStore, owner: str, req: ResponseCreateRequest, request_id: str
) -> ResponsePlan:
    """Continue the conversation, translate, admit: every 4xx before the 200."""
    earlier: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        try:
            previous, previous_items = await store.get(owner, req.previous_response_id)
        except NotFoundError:
            raise BadRequestError(
                f"Previous response with id {req.previous_response_id!r} not found.",
                param="previous_response_id", code="previous_response_not_found",
            ) from None
        earlier = previous_items + previous["output"]
    items = earlier + kept_items(req)
    chat = await start_chat(service, chat_request(req, chat_messages(req.instructions, items)), request_id)
    return ResponsePlan(
        chat=chat, req=req, id=new_id("resp"), created_at=int(time.time()), input_items=items, owner=owner,
        store=store if req.store is not False else None,
    )


# ---------------------------------------------------------------------------------------------
# The answer as output items


def output_items(plan: ResponsePlan, reasoning: str, content: str, calls: list[ToolCall], status: str) -> list:
    """Reasoning, then the message (left out when the model only called tools), then the calls."""
    out: list = []
    if reasoning:
        out.append(ReasoningOut(id=new_id("rs"), content=[ReasoningText(text=reasoning)], status=status))
    if content or not calls:
        out.append(OutputMessage(id=new_id("msg"), status=status, content=[OutputText(text=content)]))
    for call in calls:
        out.append(FunctionCallOut(
            id=new_id("fc"), call_id=call.id or new_tool_call_id(), name=call.name, arguments=call.arguments,
            status="completed",
        ))
    return out


def finished_response(plan: ResponsePlan, output: list, finish_reason: str, completion_tokens: int) -> ResponseObject:
    """The response once the answer is whole: ``incomplete`` when max_output_tokens cut it."""
    cut = finish_reason == "length"
    return plan.response(
        "incomplete" if cut else "completed", output, plan.usage(completion_tokens),
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if cut else None,
        completed_at=None if cut else int(time.time()),
    )


async def keep_response(plan: ResponsePlan, response: ResponseObject) -> None:
    """Store the response with its input items, unless the request said ``store: false``."""
    if plan.store is not None:
        await plan.store.add(plan.owner, response.model_dump(mode="json"), plan.input_items)


async def create_response(plan: ResponsePlan) -> ResponseObject:
    (choice,) = await plan.chat.run.collect()
    content, finish_reason, calls = final_answer(plan.chat, choice.content, choice.finish_reason, choice.tool_calls)
    status = "incomplete" if finish_reason == "length" else "completed"
    output = output_items(plan, reasoning_of(choice), content, calls, status)
    response = finished_response(plan, output, finish_reason, choice.completion_tokens)
    await keep_response(plan, response)
    return response


# ---------------------------------------------------------------------------------------------
# Stored responses


async def get_response(store: ResponseStore, owner: str, response_id: str) -> ResponseObject:
    response, _ = await store.get(owner, response_id)
    return ResponseObject.model_validate(response)


async def delete_response(store: ResponseStore, owner: str, response_id: str) -> ResponseDeleted:
    await store.delete(owner, response_id)
    return ResponseDeleted(id=response_id)


async def list_input_items(
    store: ResponseStore, owner: str, response_id: str, after: str | None, limit: int, order: str
) -> InputItemList:
    """The items the response was generated from (earlier turns' too), OpenAI's newest first by default."""
    _, items = await store.get(owner, response_id)
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise NotFoundError(f"no input item {after!r} in response {response_id!r}", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return InputItemList.model_validate({
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    })




# ---------------------------------------------------------------------------------------------
# Streaming: OpenAI's typed events


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
