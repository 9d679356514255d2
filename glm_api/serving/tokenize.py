"""Tokenizer serving: the chat model's tokenizer, or an embedding model's by name."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from glm_api.registry import ModelRegistry


@dataclass
class Tokens:
    model: str
    ids: list[int]
    tokens: list[str]


class TokenizeService:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def tokenize(self, text: str, model: str | None, limit: int | None = None) -> Tokens:
        owner = self.registry.tokenizer_owner(model)
        return await asyncio.to_thread(self._tokenize, owner, text, limit)

    @staticmethod
    def _tokenize(owner, text: str, limit: int | None) -> Tokens:
        if hasattr(owner, "template"):  # a chat engine
            ids = owner.template.encode(text)[:limit]
            tokens = owner.template.convert_ids_to_tokens(ids)
        else:
            ids = owner.tokenize([text])[0][:limit]
            tokens = owner.convert_ids_to_tokens(ids)
        return Tokens(owner.model_name, ids, tokens)
