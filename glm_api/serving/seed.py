"""The seed GLM-API's wire shapes over the shared services."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from glm_api.families.base import ToolCall
from glm_api.protocol.common import Usage
from glm_api.protocol.seed import (
    SeedChatChunk,
    SeedChatRequest,
    SeedChatResponse,
    SeedChoice,
    SeedChunkChoice,
    SeedDelta,
    SeedEmbeddingRequest,
    SeedEmbeddingResponse,
    SeedModelCard,
    SeedModelList,
    SeedResponseMessage,
    SeedTokenizeRequest,
    SeedTokenizeResponse,
)
from glm_api.registry import ModelRegistry
from glm_api.serving.chat import ChatCall, ChatRun
from glm_api.serving.embeddings import EmbeddingService
from glm_api.serving.messages import check_content
from glm_api.serving.tokenize import TokenizeService

#: Roles the seed accepted for tool results; inside we speak OpenAI's "tool".
_TOOL_ROLES = {"observation", "function", "tool"}


def seed_chat_call(req: SeedChatRequest) -> ChatCall:
    messages: list[dict[str, Any]] = []
    for index, m in enumerate(req.messages):
        role = "tool" if m.role in _TOOL_ROLES else m.role
        check_content(index, role, m.content)  # the seed has no tool_calls: an assistant turn is text
        message: dict[str, Any] = {"role": role, "content": m.content}
        if m.metadata:
            message["metadata"] = m.metadata
        if m.tools:
            message["tools"] = m.tools
        if m.name:
            message["name"] = m.name
        messages.append(message)
    return ChatCall(
        messages=messages,
        model=req.model,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
    )


def seed_function_call(call: ToolCall) -> str:
    """The original GLM-API's function-call answer: ``{"name", "parameters"}`` as JSON text."""
    return json.dumps({"name": call.name, "parameters": json.loads(call.arguments)}, ensure_ascii=False)


def _seed_finish(reason: str, req: SeedChatRequest) -> str:
    return "function_call" if reason == "tool_calls" and req.return_function_call else reason


async def seed_chat_response(run: ChatRun, req: SeedChatRequest, request_id: str) -> SeedChatResponse:
    (choice,) = await run.collect()
    content = seed_function_call(choice.tool_calls[0]) if choice.tool_calls else choice.content
    history = None
    if choice.tool_calls and req.return_function_call:
        history = [m.model_dump(exclude_none=True) for m in req.messages]
        history.append({"role": "assistant", "metadata": choice.tool_calls[0].name, "content": content})
    return SeedChatResponse(
        id=request_id,
        created=int(time.time()),
        model=run.model,
        choices=[
            SeedChoice(message=SeedResponseMessage(content=content), finish_reason=_seed_finish(choice.finish_reason, req))
        ],
        usage=Usage(
            prompt_tokens=run.prompt_tokens,
            completion_tokens=choice.completion_tokens,
            total_tokens=run.prompt_tokens + choice.completion_tokens,
        ),
        history=history,
    )


async def seed_chat_stream(run: ChatRun, req: SeedChatRequest, request_id: str) -> AsyncIterator[dict]:
    """``chunk: true`` sends each new piece; ``chunk: false`` the whole text so far (the seed's way)."""
    created = int(time.time())

    def event(delta: SeedDelta, finish: str | None = None) -> dict:
        chunk = SeedChatChunk(
            id=request_id, created=created, model=run.model, choices=[SeedChunkChoice(delta=delta, finish_reason=finish)]
        )
        payload = chunk.model_dump()
        payload["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # {"content": ...} as the seed sent
        return payload

    yield event(SeedDelta(role="assistant"))
    so_far = ""
    async for ev in run.events():
        text = seed_function_call(ev.tool_calls[0]) if ev.tool_calls else ev.text
        so_far += text
        if ev.finish_reason is None:
            yield event(SeedDelta(content=text if req.chunk else so_far))
            continue
        if text:
            yield event(SeedDelta(content=text if req.chunk else so_far))
        yield event(SeedDelta(content="" if req.chunk else so_far), _seed_finish(ev.finish_reason, req))


async def seed_embedding(service: EmbeddingService, req: SeedEmbeddingRequest) -> SeedEmbeddingResponse:
    engine = service.engine(req.model)
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    # The seed truncated long inputs at the model's max length; its clients rely on that.
    result = await service.embed(engine, texts, truncate=True, normalize=req.normalize)
    tokens = sum(result.token_counts)
    return SeedEmbeddingResponse(
        data=result.vectors.tolist(),
        model=engine.model_name,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


async def seed_tokenize(service: TokenizeService, req: SeedTokenizeRequest) -> SeedTokenizeResponse:
    out = await service.tokenize(req.prompt, req.model, limit=req.max_tokens)
    return SeedTokenizeResponse(tokenIds=out.ids, tokens=out.tokens, model=out.model)


def seed_models(registry: ModelRegistry) -> SeedModelList:
    cards = [
        SeedModelCard(id=name, object="embedding", created=registry.created, dimensions=engine.dimensions)
        for name, engine in registry.embeddings.items()
    ]
    cards += [
        SeedModelCard(id=name, object="rerank", created=registry.created, context_length=engine.max_seq_length)
        for name, engine in registry.rerankers.items()
    ]
    if registry.chat is not None:
        cards.append(
            SeedModelCard(
                id=registry.chat.model_name,
                object="chat.completion",
                created=registry.created,
                context_length=registry.chat.context_length,
            )
        )
        cards += [
            SeedModelCard(
                id=name, object="chat.completion", created=registry.created,
                context_length=registry.chat.context_length, parent=registry.chat.model_name,
            )
            for name in registry.adapters
        ]
    cards += [
        SeedModelCard(
            id=name, object="chat.completion", created=registry.created, context_length=engine.context_length,
            parent=getattr(engine, "parent", None),
        )
        for name, engine in registry.variants.items()
    ]
    return SeedModelList(data=cards)
