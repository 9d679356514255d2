"""Rerank engines: one relevance score per (query, document) pair.

Two kinds serve the same :class:`RerankEngine` interface:

- :class:`BatchingRerankEngine`: a cross-encoder (bge-reranker, ...) reading each pair
  together, its pairs run through the same dynamic batching queue as embeddings;
- :class:`CosineRerankEngine`: over an embedding engine, the cosine similarity of the two
  texts' vectors (as vLLM scores with embedding models), so a server without a reranker still
  answers /rerank and /score. It embeds each distinct text once, through the embedding
  engine's own queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from glm_api.engines.base import EmbeddingEngine
from glm_api.engines.batching import BatchingEngine
from glm_api.families import cross_encoder as family
from glm_api.families.cross_encoder import LoadedCrossEncoder, Pair

RerankKind = Literal["cross-encoder", "embedding-cosine"]


@dataclass
class ScoreResult:
    scores: np.ndarray  # float32 [n], one per pair, in the pairs' order
    total_tokens: int  # tokens the model read (after truncation)


class RerankEngine(Protocol):
    model_name: str
    max_seq_length: int
    kind: RerankKind

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def check_health(self) -> None: ...

    async def score(self, pairs: list[Pair]) -> ScoreResult: ...

    def count_tokens(self, pairs: list[Pair]) -> list[int]:
        """Per pair, the longest input the model would read without truncation, to compare with
        ``max_seq_length`` (blocking: tokenizer only)."""

    def clip_texts(self, texts: list[str], max_tokens: int) -> list[str]:
        """Each text cut after its first ``max_tokens`` tokens (blocking: tokenizer only)."""


class BatchingRerankEngine(BatchingEngine[Pair, ScoreResult]):
    _kind = "rerank engine"
    _items_noun = "pairs"
    _work_verb = "scored"
    kind: RerankKind = "cross-encoder"

    def __init__(
        self,
        loaded: LoadedCrossEncoder,
        model_name: str,
        *,
        batch_size: int = 32,
        batch_wait_ms: float = 2.0,
        max_queued_pairs: int = 4096,
    ) -> None:
        super().__init__(model_name, batch_size=batch_size, batch_wait_ms=batch_wait_ms, max_queued=max_queued_pairs)
        self.loaded = loaded
        self.max_seq_length = loaded.max_seq_length
        self.family = loaded.family
        self.source = loaded.source

    async def score(self, pairs: list[Pair]) -> ScoreResult:
        return await self._submit(list(pairs))

    def count_tokens(self, pairs: list[Pair]) -> list[int]:
        return family.count_tokens(self.loaded, pairs)

    def clip_texts(self, texts: list[str], max_tokens: int) -> list[str]:
        return family.clip_texts(self.loaded, texts, max_tokens)

    # -- the batching queue's hooks (worker thread) ------------------------------------------

    def _prepare(self, items: list[Pair]) -> dict[str, Any]:
        return family.prepare(self.loaded, items)

    def _token_lengths(self, features: dict[str, Any]) -> list[int]:
        return family.token_lengths(features)

    def _forward(self, features: dict[str, Any], rows: list[int]) -> np.ndarray:
        return family.forward(self.loaded, family.take_rows(self.loaded, features, rows))

    def _result(self, rows: list[Any], counts: list[int]) -> ScoreResult:
        return ScoreResult(np.asarray(rows, dtype=np.float32).reshape(len(rows)), int(sum(counts)))


class CosineRerankEngine:
    """Scores pairs by the cosine similarity of an embedding model's vectors. Holds no thread
    of its own: it is a view of the embedding engine, started and stopped with it."""

    kind: RerankKind = "embedding-cosine"

    def __init__(self, embeddings: EmbeddingEngine) -> None:
        self.embeddings = embeddings
        self.model_name = embeddings.model_name
        self.max_seq_length = embeddings.max_seq_length

    def start(self) -> None:  # the embedding engine's own start and stop are the registry's
        pass

    def stop(self) -> None:
        pass

    def check_health(self) -> None:
        self.embeddings.check_health()

    def count_tokens(self, pairs: list[Pair]) -> list[int]:
        texts = _distinct(t for pair in pairs for t in pair)
        counts = dict(zip(texts, self.embeddings.count_tokens(texts)))
        return [max(counts[a], counts[b]) for a, b in pairs]

    def clip_texts(self, texts: list[str], max_tokens: int) -> list[str]:
        return self.embeddings.clip_texts(texts, max_tokens)

    async def score(self, pairs: list[Pair]) -> ScoreResult:
        texts = _distinct(t for pair in pairs for t in pair)
        result = await self.embeddings.embed(texts)
        where = {text: i for i, text in enumerate(texts)}
        vectors = result.vectors.astype(np.float64)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        left = vectors[[where[a] for a, _ in pairs]]
        right = vectors[[where[b] for _, b in pairs]]
        return ScoreResult((left * right).sum(axis=1).astype(np.float32), int(sum(result.token_counts)))


def _distinct(texts) -> list[str]:
    return list(dict.fromkeys(texts))
