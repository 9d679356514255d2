"""Rerank and score serving: /rerank, /v1/rerank, /v2/rerank, /score and /v1/score over one
:class:`RerankService`.

The routes differ only in wire shape. All score (query, document) pairs with the model asked
for: a cross-encoder, or, by an embedding model's name (or by default when no cross-encoder is
loaded), that model's cosine similarity. Over-long inputs follow the embedding routes' rule: a
400 naming the input unless ``truncate: true``; Cohere's v2 route truncates, as Cohere does.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from glm_api.config import Settings
from glm_api.engines.rerank_engine import RerankEngine, ScoreResult
from glm_api.errors import BadRequestError
from glm_api.protocol.rerank import (
    CohereMeta,
    CohereTokens,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    RerankV2Request,
    RerankV2Response,
    RerankV2Result,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
)
from glm_api.registry import ModelRegistry
from glm_api.request_context import record_tokens


class RerankService:
    def __init__(self, registry: ModelRegistry, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings

    def engine(self, model: str | None) -> RerankEngine:
        engine = self.registry.rerank_engine(model)
        engine.check_health()
        return engine

    async def score(
        self, engine: RerankEngine, pairs: list[tuple[str, str]], *, truncate: bool, param: str
    ) -> ScoreResult:
        """Scores of ``pairs``; a pair over the model's limit is a 400 naming ``param[i]`` unless
        ``truncate``."""
        most = min(self.settings.max_embedding_inputs, self.settings.max_embedding_queue)
        if len(pairs) > most:  # a 400, not a 429: it would not fit even in an idle server
            raise BadRequestError(f"{len(pairs)} {param}; at most {most} per request", param=param)
        token_limit = self.settings.max_embedding_tokens
        if not truncate or token_limit is not None:  # tokenising costs: only when a check needs it
            counts = await asyncio.to_thread(engine.count_tokens, pairs)
            too_long = [i for i, n in enumerate(counts) if n > engine.max_seq_length]
            if too_long and not truncate:
                i = too_long[0]
                raise BadRequestError(
                    f"{param}[{i}] is {counts[i]} tokens with its query; model {engine.model_name!r} takes at most "
                    f"{engine.max_seq_length} (shorten it, or ask for truncation)",
                    param=f"{param}[{i}]",
                )
            total = sum(min(n, engine.max_seq_length) for n in counts)
            if token_limit is not None and total > token_limit:
                raise BadRequestError(
                    f"the inputs are {total} tokens in all; this server reads at most {token_limit} per request",
                    param=param,
                )
        result = await engine.score(pairs)
        record_tokens(prompt=result.total_tokens)
        return result


def ranked(scores: np.ndarray, top_n: int | None) -> list[int]:
    """Indices by descending score (ties keep the documents' order), the first ``top_n``."""
    order = np.argsort(-scores.astype(np.float64), kind="stable").tolist()
    return order[:top_n] if top_n is not None else order


async def rerank(service: RerankService, req: RerankRequest, request_id: str) -> RerankResponse:
    engine = service.engine(req.model)
    documents = req.document_texts()
    result = await service.score(engine, [(req.query, d) for d in documents], truncate=req.truncate, param="documents")
    results = [
        RerankResult(
            index=i,
            relevance_score=float(result.scores[i]),
            document=RerankDocument(text=documents[i]) if req.return_documents else None,
        )
        for i in ranked(result.scores, req.top_n)
    ]
    usage = RerankUsage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens)
    return RerankResponse(id=f"rerank-{request_id}", model=engine.model_name, results=results, usage=usage)


async def rerank_v2(service: RerankService, req: RerankV2Request, request_id: str) -> RerankV2Response:
    engine = service.engine(req.model)
    documents = req.documents
    if req.max_tokens_per_doc is not None:  # Cohere's: each document cut to its first N tokens
        documents = await asyncio.to_thread(engine.clip_texts, documents, req.max_tokens_per_doc)
    result = await service.score(engine, [(req.query, d) for d in documents], truncate=True, param="documents")
    results = [
        RerankV2Result(index=i, relevance_score=float(result.scores[i])) for i in ranked(result.scores, req.top_n)
    ]
    meta = CohereMeta(tokens=CohereTokens(input_tokens=result.total_tokens))
    return RerankV2Response(id=f"rerank-{request_id}", results=results, meta=meta)


async def score(service: RerankService, req: ScoreRequest, request_id: str) -> ScoreResponse:
    engine = service.engine(req.model)
    result = await service.score(engine, req.pairs(), truncate=req.truncate, param="text_2")
    return ScoreResponse(
        id=f"score-{request_id}",
        created=int(time.time()),
        model=engine.model_name,
        data=[ScoreData(index=i, score=float(s)) for i, s in enumerate(result.scores)],
        usage=ScoreUsage(prompt_tokens=result.total_tokens, total_tokens=result.total_tokens),
    )
