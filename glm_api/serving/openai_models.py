"""/v1/models, /v1/tokenize and /v1/detokenize."""

from __future__ import annotations

import asyncio

from glm_api.errors import BadRequestError, NotFoundError
from glm_api.protocol.openai import ModelCard, ModelList
from glm_api.protocol.tokenizer import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from glm_api.registry import ModelRegistry
from glm_api.serving.chat import ChatCall, ChatService
from glm_api.serving.openai_chat_call import openai_messages, tool_dicts
from glm_api.serving.tokenize import TokenizeService


def model_cards(registry: ModelRegistry) -> list[ModelCard]:
    cards = []
    if registry.chat is not None:
        cards.append(
            ModelCard(
                id=registry.chat.model_name,
                created=registry.created,
                kind="chat",
                context_length=registry.chat.context_length,
            )
        )
        cards += [  # each LoRA adapter is a chat model of its own, over the base
            ModelCard(
                id=name, created=registry.created, kind="chat", context_length=registry.chat.context_length,
                parent=registry.chat.model_name,
            )
            for name in registry.adapters
        ]
    cards += [
        ModelCard(
            id=name, created=registry.created, kind="chat", context_length=engine.context_length,
            parent=getattr(engine, "parent", None),
        )
        for name, engine in registry.variants.items()
    ]
    cards += [
        ModelCard(
            id=name,
            created=registry.created,
            kind="embedding",
            context_length=e.max_seq_length,
            dimensions=e.dimensions,
        )
        for name, e in registry.embeddings.items()
    ]
    cards += [
        ModelCard(id=name, created=registry.created, kind="rerank", context_length=e.max_seq_length)
        for name, e in registry.rerankers.items()
    ]
    return cards


def list_models(registry: ModelRegistry) -> ModelList:
    return ModelList(data=model_cards(registry))


def get_model(registry: ModelRegistry, model_id: str) -> ModelCard:
    for card in model_cards(registry):
        if card.id == model_id:
            return card
    loaded = ", ".join(c.id for c in model_cards(registry))
    raise NotFoundError(f"model {model_id!r} is not loaded; models here: {loaded}", param="model")


async def tokenize(chat: ChatService, tokens: TokenizeService, req: TokenizeRequest) -> TokenizeResponse:
    if req.messages is not None:
        # The same path as a chat request, so the count is exactly what that request costs.
        call = ChatCall(messages=openai_messages(req.messages), model=req.model, tools=tool_dicts(req.tools),
                        template_options=req.chat_template_kwargs)
        prompt = await chat.prepare(call)
        if req.tools and not prompt.tools_enabled:
            raise BadRequestError(f"model {prompt.engine.model_name!r} does not support tools", param="tools")
        strs = await asyncio.to_thread(prompt.engine.template.convert_ids_to_tokens, prompt.ids)
        engine = prompt.engine
        return TokenizeResponse(
            model=engine.model_name,
            count=len(prompt.ids),
            max_model_len=engine.context_length,
            tokens=prompt.ids,
            token_strs=strs,
        )
    assert req.prompt is not None  # the request model allows exactly one of the two
    owner = tokens.registry.tokenizer_owner(req.model)
    out = await tokens.tokenize(req.prompt, req.model)
    max_len = getattr(owner, "context_length", None) or owner.max_seq_length
    return TokenizeResponse(
        model=out.model, count=len(out.ids), max_model_len=max_len, tokens=out.ids, token_strs=out.tokens
    )


async def detokenize(tokens: TokenizeService, req: DetokenizeRequest) -> DetokenizeResponse:
    model, text = await tokens.detokenize(req.tokens, req.model)
    return DetokenizeResponse(model=model, prompt=text)
