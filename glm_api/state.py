"""What the app holds between requests, in ``app.state.glm`` (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from glm_api.config import Settings
from glm_api.registry import ModelRegistry
from glm_api.serving.chat import ChatService
from glm_api.serving.embeddings import EmbeddingService
from glm_api.serving.rerank import RerankService
from glm_api.serving.tokenize import TokenizeService

if TYPE_CHECKING:
    from glm_api.serving.batches import BatchStore
    from glm_api.serving.responses_store import ResponseStore


@dataclass
class Services:
    registry: ModelRegistry
    chat: ChatService
    embeddings: EmbeddingService
    tokenize: TokenizeService
    rerank: RerankService

    @classmethod
    def build(cls, registry: ModelRegistry, settings: Settings) -> "Services":
        return cls(
            registry, ChatService(registry, settings), EmbeddingService(registry, settings), TokenizeService(registry),
            RerankService(registry, settings),
        )


@dataclass
class AppState:
    settings: Settings
    services: Services | None = None  # None while the models are loading
    load_error: str | None = None
    batches: BatchStore | None = None  # the Batch API's files, batches and runner
    responses: ResponseStore | None = None  # the Responses API's stored responses
