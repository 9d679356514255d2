"""Tokenizer serving: the chat model's tokenizer, or an embedding model's by name."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from glm_api.engines.base import Tokenizing
from glm_api.errors import BadRequestError
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

    async def detokenize(self, ids: list[int], model: str | None) -> tuple[str, str]:
        """(model name, text) of token ids of the chat model or a named embedding model."""
        owner = self.registry.tokenizer_owner(model)
        return owner.model_name, await asyncio.to_thread(decode_ids, owner, ids)

    @staticmethod
    def _tokenize(owner: Tokenizing, text: str, limit: int | None) -> Tokens:
        """The text as the model's own tokenizer encodes it by default, special tokens included
        (vLLM's add_special_tokens default; the seed's ChatGLM3 ids began with [gMASK] sop too).
        ``limit`` cuts the whole list."""
        ids = owner.tokenize([text])[0][:limit]
        return Tokens(owner.model_name, ids, owner.convert_ids_to_tokens(ids))


def check_token_ids(convert_ids_to_tokens, ids: list[int], limit: int | None, param: str) -> list[str]:
    """The token string of each id, or a 400 for an id the model does not have (an id past the
    embedding table would otherwise fail inside the engine, for every request in its batch)."""
    bad = [i for i in ids if i < 0 or (limit is not None and i >= limit)]
    tokens = [] if bad else convert_ids_to_tokens(ids)
    bad = bad or [i for i, token in zip(ids, tokens) if token is None]
    if bad:
        raise BadRequestError(f"token id {bad[0]} is not in this model's vocabulary", param=param)
    return tokens


def decode_ids(owner: Tokenizing, ids: list[int], param: str = "tokens") -> str:
    """Text of ids for the chat model or an embedding model, refusing ids it does not have."""
    check_token_ids(owner.convert_ids_to_tokens, ids, owner.vocab_size, param)
    return owner.decode(ids)
