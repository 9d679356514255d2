"""/v1/chat/completions over the shared ChatService: OpenAI messages in, OpenAI shapes out.

The request becomes one engine call in :mod:`glm_api.serving.openai_chat_call`; this module
admits it and shapes the answer. Everything that can fail deterministically fails in
:func:`start_chat`, before the 200, grammar compilation included.

``response_format`` (``json_object``, ``json_schema``) and the ``structured_outputs`` extra are
enforced by constrained decoding (:mod:`glm_api.serving.structured`): the answer parses and
validates unless ``max_tokens`` cut it (``finish_reason: "length"``, as OpenAI documents).
``tool_choice: "required"`` or a named function constrains the answer to a call of the offered
tools, returned as ``tool_calls``, on every model; ``"auto"`` leaves it to the family's own
tool syntax.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from glm_api import __version__
from glm_api.engines.base import ChatEngine, TokenLogprob
from glm_api.families.base import ToolCall, ToolCallPart
from glm_api.protocol.openai import (
    ChatChoiceOut,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    FunctionCallDelta,
    FunctionCallOut,
    OpenAIUsage,
    ToolCallDelta,
    ToolCallOut,
)
from glm_api.serving.chat import ChatRun, ChatService
from glm_api.serving.logprobs import TokenTexts, chat_logprobs
from glm_api.serving.openai_chat_call import chat_call
from glm_api.serving.structured import parse_tool_call


def system_fingerprint(engine: ChatEngine) -> str:
    """Stable while the same weights are served the same way: name, family, source, dtype."""
    info = engine.describe()
    facts = (engine.model_name, info.family, info.source, info.dtype, __version__)
    return "fp_" + hashlib.sha256("|".join(map(str, facts)).encode()).hexdigest()[:10]


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ChatPlan:
    """An admitted chat request and what its response needs."""

    run: ChatRun
    n: int
    id: str
    created: int
    fingerprint: str
    include_usage: bool
    forced_tool: bool = False  # the answer is a constrained tool call, returned as tool_calls
    tool_ids: dict[tuple[int, int], str] = field(default_factory=dict)
    top_logprobs: int | None = None  # logprobs asked for, with this many alternatives (else None)
    token_texts: TokenTexts | None = None

    def logprobs(self, tokens: list[TokenLogprob]) -> ChoiceLogprobs | None:
        if self.top_logprobs is None or self.token_texts is None:
            return None
        return chat_logprobs(self.token_texts, tokens, self.top_logprobs)


async def start_chat(
    service: ChatService, req: ChatCompletionRequest, request_id: str, *, priority: int = 0
) -> ChatPlan:
    engine = service.registry.chat_engine(req.model)  # 404 before anything else
    call, forced = chat_call(req, engine)
    call.priority = priority
    run = await service.start(call, request_id)
    return ChatPlan(
        run=run,
        n=call.n,
        id=f"chatcmpl-{request_id}",
        created=int(time.time()),
        fingerprint=system_fingerprint(engine),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        forced_tool=forced,
        top_logprobs=call.logprobs,
        token_texts=service.token_texts(engine) if call.logprobs is not None else None,
    )


def final_answer(plan: ChatPlan, content: str, finish_reason: str, tool_calls: list[ToolCall]):
    """A forced tool call's constrained JSON becomes ``tool_calls`` (unless max_tokens cut it)."""
    if plan.forced_tool and finish_reason != "length":
        calls = parse_tool_call(content)
        if calls:
            return "", "tool_calls", calls
    return content, finish_reason, tool_calls


def _tool_calls_out(plan: ChatPlan, index: int, calls: list[ToolCall]) -> list[ToolCallOut]:
    out = []
    for j, call in enumerate(calls):
        call_id = plan.tool_ids.setdefault((index, j), call.id or new_tool_call_id())
        out.append(ToolCallOut(id=call_id, function=FunctionCallOut(name=call.name, arguments=call.arguments)))
    return out


async def chat_response(plan: ChatPlan) -> ChatCompletion:
    choices = await plan.run.collect()
    out = []
    for choice in choices:
        content, finish_reason, tool_calls = final_answer(plan, choice.content, choice.finish_reason, choice.tool_calls)
        calls = _tool_calls_out(plan, choice.index, tool_calls)
        # OpenAI sends content null on a message that only calls tools.
        message = ChatMessageOut(
            content=(content or None) if calls else content, tool_calls=calls or None,
            reasoning_content=choice.reasoning or None, reasoning=choice.reasoning or None,
        )
        out.append(
            ChatChoiceOut(
                index=choice.index, message=message, finish_reason=finish_reason, logprobs=plan.logprobs(choice.logprobs)
            )
        )
    completion = sum(c.completion_tokens for c in choices)
    reasoning = sum(c.reasoning_tokens for c in choices)
    return ChatCompletion(
        id=plan.id,
        created=plan.created,
        model=plan.run.model,
        system_fingerprint=plan.fingerprint,
        choices=out,
        usage=_usage(plan, completion, reasoning),
    )


def _usage(plan: ChatPlan, completion_tokens: int, reasoning_tokens: int) -> OpenAIUsage:
    return OpenAIUsage.counted(plan.run.prompt_tokens, completion_tokens, plan.run.cached_tokens, reasoning_tokens)


def _part_delta(plan: ChatPlan, index: int, part: ToolCallPart) -> ToolCallDelta:
    """A call's first piece carries its id, type and name; the next ones only arguments."""
    if part.name is None:
        return ToolCallDelta(index=part.index, function=FunctionCallDelta(arguments=part.arguments))
    call_id = plan.tool_ids.setdefault((index, part.index), new_tool_call_id())
    return ToolCallDelta(
        index=part.index, id=call_id, type="function",
        function=FunctionCallDelta(name=part.name, arguments=part.arguments),
    )


def _chunk(plan: ChatPlan, choices: list[ChatChunkChoice], usage: OpenAIUsage | None = None) -> dict:
    chunk = ChatCompletionChunk(
        id=plan.id,
        created=plan.created,
        model=plan.run.model,
        system_fingerprint=plan.fingerprint,
        choices=choices,
        usage=usage,
    )
    payload = chunk.model_dump()
    for out, choice in zip(payload["choices"], choices):
        out["delta"] = choice.delta.model_dump(exclude_none=True)  # only what this chunk carries
    if not plan.include_usage:
        del payload["usage"]
    return payload


async def chat_stream(plan: ChatPlan) -> AsyncIterator[dict]:
    """OpenAI chunks as the engine produces them: the role first, then reasoning deltas
    (``reasoning_content`` and ``reasoning``, same text) before the answer's content deltas,
    each tool call's id and name before its arguments, then its finish_reason; with
    ``include_usage`` a last chunk with ``choices: []`` and the usage. A forced tool call's JSON
    is not shown as content."""
    for i in range(plan.n):
        yield _chunk(plan, [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
    texts: dict[int, list[str]] = {i: [] for i in range(plan.n)}
    # Log-probabilities go with the chunk that shows their tokens' text; a forced tool call's
    # (never shown as content), the reasoning's and the stop token's go with the next content
    # chunk or the choice's last chunk.
    unsent: dict[int, list[TokenLogprob]] = {i: [] for i in range(plan.n)}
    completion_tokens = reasoning_tokens = 0
    async for event in plan.run.events():
        index = event.index
        unsent[index] += event.logprobs
        if event.reasoning:
            delta = ChatDelta(reasoning_content=event.reasoning, reasoning=event.reasoning)
            yield _chunk(plan, [ChatChunkChoice(index=index, delta=delta)])
        if event.text:
            texts[index].append(event.text)
            if not plan.forced_tool:
                logprobs, unsent[index] = plan.logprobs(unsent[index]), []
                yield _chunk(plan, [ChatChunkChoice(index=index, delta=ChatDelta(content=event.text), logprobs=logprobs)])
        if event.tool_parts and not plan.forced_tool:
            deltas = [_part_delta(plan, index, part) for part in event.tool_parts]
            yield _chunk(plan, [ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=deltas))])
        if event.finish_reason is None:
            continue
        content, finish_reason, tool_calls = final_answer(plan, "".join(texts[index]), event.finish_reason,
                                                     event.tool_calls)
        if plan.forced_tool:
            if content:  # cut before the call closed: show what was written
                yield _chunk(plan, [ChatChunkChoice(index=index, delta=ChatDelta(content=content))])
            if tool_calls:
                parts = [ToolCallPart(j, call.name, call.arguments) for j, call in enumerate(tool_calls)]
                deltas = [_part_delta(plan, index, part) for part in parts]
                yield _chunk(plan, [ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=deltas))])
        completion_tokens += event.completion_tokens
        reasoning_tokens += event.reasoning_tokens
        last = unsent[index]
        logprobs = plan.logprobs(last) if last else None
        yield _chunk(
            plan, [ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason, logprobs=logprobs)]
        )
    if plan.include_usage:
        yield _chunk(plan, [], _usage(plan, completion_tokens, reasoning_tokens))
