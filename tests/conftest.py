"""Shared fixtures: the packaged default models loaded once per session, and apps over them.

Nothing is mocked: engines run the real models (the packaged SmolLM2-135M-Instruct and
all-MiniLM-L6-v2, or tiny models the fixtures build and save).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub, even by accident
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from fastapi.testclient import TestClient

from glm_api.app import create_app
from glm_api.config import Settings
from glm_api.engines.embedding_engine import BatchingEmbeddingEngine
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.families.base import LoadedChatModel, LoadedEmbeddingModel
from glm_api.families.embedding import load_embedding_model, packaged_embedding_path
from glm_api.families.detect import load_chat_model
from glm_api.families.transformers_lm import packaged_chat_gguf
from glm_api.registry import PACKAGED_CHAT_NAME, PACKAGED_EMBEDDING_NAME, ModelRegistry

pytest_plugins = [
    "tests.fixtures.tiny_causal_lm",
    "tests.fixtures.tiny_encoders",
    "tests.fixtures.tiny_cross_encoders",
    "tests.fixtures.chatglm3_tiny",
    "tests.fixtures.chatglm3_tools",
    "tests.fixtures.glm45_tiny",
    "tests.fixtures.glm4_chat_tiny",
    "tests.fixtures.tool_calling_lm",
]

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache_dir) -> LoadedChatModel:
    """The packaged chat default, from the session's GGUF conversion cache, loaded as the server
    loads it (load_chat_model: on CPU, with its linear weights stored input-major)."""
    return load_chat_model(packaged_chat_gguf(), CPU, torch.float32, smollm2_cache_dir)


@pytest.fixture(scope="session")
def minilm() -> LoadedEmbeddingModel:
    return load_embedding_model(packaged_embedding_path(), CPU, torch.float32)


def make_settings(**overrides) -> Settings:
    """Settings as the server reads them, except ``cpu_kernels`` "off" unless a test passes it:
    with "auto" (the default) every registry built from them times its projections at start-up
    (dense packing, then the fused decode projections), ~1 s for a tiny model, ~8 s for SmolLM2,
    which no in-process test here is about. tests/families/test_dense_kernels.py and
    tests/engines/test_direct_decode.py check those kernels; live_server serves the timed choice."""
    return Settings(_env_file=None, **{"cpu_kernels": "off", **overrides})


def make_registry(chat: LoadedChatModel | None, embeddings: dict[str, LoadedEmbeddingModel], settings: Settings) -> ModelRegistry:
    engine = None
    if chat is not None:
        engine = TransformersChatEngine(
            chat, settings.chat_model_name or PACKAGED_CHAT_NAME,
            max_running=settings.max_running, max_waiting=settings.max_waiting,
            prefix_cache_tokens=settings.prefix_cache_tokens,
        )
    return ModelRegistry(
        engine,
        {
            name: BatchingEmbeddingEngine(
                loaded, name, batch_size=settings.embedding_batch_size,
                batch_wait_ms=settings.embedding_batch_wait_ms, max_queued_texts=settings.max_embedding_queue,
            )
            for name, loaded in embeddings.items()
        },
    )


@pytest.fixture(scope="session")
def default_settings() -> Settings:
    return make_settings()


@pytest.fixture(scope="session")
def client(smollm2, minilm, default_settings):
    """A TestClient over the packaged defaults; its lifespan starts and stops the engines."""
    registry = make_registry(smollm2, {PACKAGED_EMBEDDING_NAME: minilm}, default_settings)
    with TestClient(create_app(default_settings, registry)) as test_client:
        yield test_client
