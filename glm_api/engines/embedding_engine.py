"""Embedding engine: texts through the shared dynamic batching queue
(:mod:`glm_api.engines.batching`), one sentence vector per text."""

from __future__ import annotations

from typing import Any

import numpy as np

from glm_api.engines.base import EmbeddingResult
from glm_api.engines.batching import FORWARD_OVERHEAD_TOKENS, MAX_WAIT_FACTOR, BatchingEngine, split_by_length
from glm_api.families import embedding as family
from glm_api.families.base import LoadedEmbeddingModel

__all__ = ["BatchingEmbeddingEngine", "FORWARD_OVERHEAD_TOKENS", "MAX_WAIT_FACTOR", "split_by_length"]


class BatchingEmbeddingEngine(BatchingEngine[str, EmbeddingResult]):
    _kind = "embedding engine"
    _items_noun = "texts"
    _work_verb = "embedded"

    def __init__(
        self,
        loaded: LoadedEmbeddingModel,
        model_name: str,
        *,
        batch_size: int = 32,
        batch_wait_ms: float = 2.0,
        max_queued_texts: int = 4096,
    ) -> None:
        super().__init__(model_name, batch_size=batch_size, batch_wait_ms=batch_wait_ms, max_queued=max_queued_texts)
        self.loaded = loaded
        self.dimensions = loaded.dimensions
        self.max_seq_length = loaded.max_seq_length
        self.family = loaded.family
        self.source = loaded.source

    def count_tokens(self, texts: list[str]) -> list[int]:
        return family.count_tokens(self.loaded, texts)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return family.tokenize(self.loaded, texts)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.loaded.model.tokenizer.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return family.decode(self.loaded, ids)

    def clip_texts(self, texts: list[str], max_tokens: int) -> list[str]:
        return family.clip_texts(self.loaded, texts, max_tokens)

    @property
    def vocab_size(self) -> int | None:
        return family.vocab_size(self.loaded)

    async def embed(self, texts: list[str]) -> EmbeddingResult:
        return await self._submit(texts)

    # -- the batching queue's hooks (worker thread) ------------------------------------------

    def _prepare(self, items: list[str]) -> dict[str, Any]:
        return family.prepare(self.loaded, items)

    def _token_lengths(self, features: dict[str, Any]) -> list[int]:
        return family.token_lengths(features)

    def _forward(self, features: dict[str, Any], rows: list[int]) -> np.ndarray:
        return family.forward(self.loaded, family.take_rows(self.loaded, features, rows))

    def _result(self, rows: list[Any], counts: list[int]) -> EmbeddingResult:
        if not rows:
            return EmbeddingResult(np.zeros((0, self.dimensions), dtype=np.float32), [])
        return EmbeddingResult(np.stack(rows).astype(np.float32, copy=False), list(counts))
