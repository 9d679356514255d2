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

With ``stream: true`` the same plan's answer is sent as typed events by
:mod:`glm_api.serving.responses_stream`, which builds on this module (the dependency goes one
way: this module does not import it).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from glm_api.errors import BadRequestError, NotFoundError
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
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        json_schema = fmt.model_dump(by_alias=True, exclude={"type"})
        body["response_format"] = {"type": "json_schema", "json_schema": json_schema}
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
