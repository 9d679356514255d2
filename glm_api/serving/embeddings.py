"""Embedding serving shared by /embedding and /v1/embeddings."""

from __future__ import annotations

import asyncio

import numpy as np

from glm_api.config import Settings
from glm_api.engines.base import EmbeddingEngine, EmbeddingResult
from glm_api.errors import BadRequestError
from glm_api.registry import ModelRegistry
from glm_api.request_context import record_tokens


class EmbeddingService:
    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    def engine(self, model: str | None) -> EmbeddingEngine:
        engine = self.registry.embedding_engine(model)
        engine.check_health()
        return engine

    async def embed(
        self, engine: EmbeddingEngine, texts: list[str], *, truncate: bool, normalize: bool = False
    ) -> EmbeddingResult:
        """Embed texts; inputs over the model's limit are a 400 unless ``truncate``."""
        most = min(self.settings.max_embedding_inputs, self.settings.max_embedding_queue)
        if len(texts) > most:  # a 400, not a 429: it would not fit even in an idle server
            raise BadRequestError(f"{len(texts)} inputs; at most {most} per request", param="input")
        token_limit = self.settings.max_embedding_tokens
        if not truncate or token_limit is not None:  # tokenising costs: only when a check needs it
            counts = await asyncio.to_thread(engine.count_tokens, texts)
            too_long = [i for i, n in enumerate(counts) if n > engine.max_seq_length]
            if too_long and not truncate:
                raise BadRequestError(
                    f"input {too_long[0]} is {counts[too_long[0]]} tokens; model {engine.model_name!r} takes at "
                    f"most {engine.max_seq_length} (shorten it, or ask for truncation)",
                    param="input",
                )
            total = sum(min(n, engine.max_seq_length) for n in counts)
            if token_limit is not None and total > token_limit:
                raise BadRequestError(
                    f"the inputs are {total} tokens in all; this server embeds at most {token_limit} per request",
                    param="input",
                )
        result = await engine.embed(texts)
        record_tokens(prompt=sum(result.token_counts))
        if normalize:
            norms = np.linalg.norm(result.vectors, axis=1, keepdims=True)
            result = EmbeddingResult(result.vectors / np.maximum(norms, 1e-12), result.token_counts)
        return result
