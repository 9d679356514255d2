"""A chat model served as a pinned prefix over another engine's model (P-Tuning v2), under its own name.

The base engine (one :class:`~glm_api.engines.chat_engine.TransformersChatEngine`, or a replica
balancer over several) holds the prefix's keys/values pinned in its KV pool, by name
(:mod:`pinned_prefix`). This view is what the registry hands the serving layer for a request
whose ``model`` is the prefix's name: the same engine, tokenizer and template, with every
request tagged with the prefix, so its rows share the base's batches, steps and pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from glm_api.engines.base import ChatEngine, EngineInfo, GenerationChunk, SamplingParams


class PrefixedChatEngine:
    """``base`` with the pinned prefix ``prefix`` before every prompt, served as ``model_name``;
    ``parent``: the base model's name (``/v1/models``), ``source``: the prefix's folder."""

    def __init__(self, base: ChatEngine, model_name: str, *, prefix: str, parent: str, source: str) -> None:
        self.base = base
        self.model_name = model_name
        self.prefix = prefix
        self.parent = parent
        self.source = source

    @property
    def context_length(self) -> int:
        return self.base.context_length

    @property
    def template(self) -> Any:
        return self.base.template

    def describe(self) -> EngineInfo:
        info = self.base.describe()
        return EngineInfo(info.family, f"{info.source} + P-Tuning v2 {self.source}", info.dtype)

    def start(self) -> None:  # the registry starts and stops the base
        pass

    def stop(self) -> None:
        pass

    def check_health(self) -> None:
        self.base.check_health()

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        return self.base.generate(prompt_ids, replace(params, prefix=self.prefix), request_id)

    def abort(self, request_id: str) -> None:
        self.base.abort(request_id)

    def compile_constraint(self, constraint: Any) -> Any:
        return self.base.compile_constraint(constraint)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.base.tokenize(texts)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return self.base.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return self.base.decode(ids)

    @property
    def vocab_size(self) -> int | None:
        return self.base.vocab_size

    def cached_prefix_tokens(self, prompt_ids: list[int]) -> int:
        return self.base.cached_prefix_tokens(prompt_ids, self.prefix)

    @property
    def num_running(self) -> int:
        return self.base.num_running

    @property
    def num_waiting(self) -> int:
        return self.base.num_waiting

    def __getattr__(self, name: str) -> Any:
        # Anything else an engine offers (load figures, the family, the device) is the base's.
        if name == "base":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)
