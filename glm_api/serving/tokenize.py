"""Tokenizer serving: the chat model's tokenizer, or an embedding model's by name."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

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
    def _tokenize(owner, text: str, limit: int | None) -> Tokens:
        """The text as the model's own tokenizer encodes it by default, special tokens included
        (vLLM's add_special_tokens default; the seed's ChatGLM3 ids began with [gMASK] sop too).
        ``limit`` cuts the whole list."""
        if hasattr(owner, "template"):  # a chat engine
            ids = owner.template.encode(text, add_special_tokens=True)[:limit]
            tokens = owner.template.convert_ids_to_tokens(ids)
        else:
            ids = owner.tokenize([text])[0][:limit]
            tokens = owner.convert_ids_to_tokens(ids)
        return Tokens(owner.model_name, ids, tokens)


def check_token_ids(convert_ids_to_tokens, ids: list[int], limit: int | None, param: str) -> list[str]:
    """The token string of each id, or a 400 for an id the model does not have (an id past the
    embedding table would otherwise fail inside the engine, for every request in its batch)."""
    bad = [i for i in ids if i < 0 or (limit is not None and i >= limit)]
    tokens = [] if bad else convert_ids_to_tokens(ids)
    bad = bad or [i for i, token in zip(ids, tokens) if token is None]
    if bad:
        raise BadRequestError(f"token id {bad[0]} is not in this model's vocabulary", param=param)
    return tokens


def vocab_limit(owner) -> int | None:
    """Rows of the model's input embedding, where the engine exposes its model (else None)."""
    model = getattr(owner, "model", None) or getattr(getattr(owner, "loaded", None), "model", None)
    embeddings = getattr(model, "get_input_embeddings", None)
    if embeddings is None:  # a SentenceTransformer: its first module holds the transformer
        inner = getattr(getattr(model, "_first_module", lambda: None)(), "auto_model", None)
        embeddings = getattr(inner, "get_input_embeddings", None)
    table = embeddings() if embeddings is not None else None
    return getattr(table, "num_embeddings", None)


def embedding_tokenizer(engine):
    """The HF tokenizer of an embedding engine (the engine interface has no ``decode``)."""
    return engine.loaded.model.tokenizer


def decode_ids(owner, ids: list[int], param: str = "tokens") -> str:
    """Text of ids for the chat model or an embedding model, refusing ids it does not have."""
    if hasattr(owner, "template"):  # a chat engine
        check_token_ids(owner.template.convert_ids_to_tokens, ids, vocab_limit(owner), param)
        return owner.template.decode(ids)
    check_token_ids(owner.convert_ids_to_tokens, ids, vocab_limit(owner), param)
    return embedding_tokenizer(owner).decode(ids, skip_special_tokens=True)
