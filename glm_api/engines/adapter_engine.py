"""A LoRA adapter seen by the serving layer as a chat model of its own.

:class:`AdapterEngine` is the chat engine (one engine, or a replica balancer) under the adapter's
name: every request it admits carries ``SamplingParams.adapter``, so the runner computes that
request's rows with the adapter's deltas; everything else (tokenizer, template, limits, health)
is the base engine's. So chat, completions, responses, the seed routes and batch lines choose an
adapter by ``model`` without knowing adapters exist, and answer with the adapter's name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from glm_api.engines.base import ChatEngine, GenerationChunk, SamplingParams


class AdapterEngine:
    def __init__(self, base: ChatEngine, name: str) -> None:
        self.base = base
        self.model_name = name

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        return self.base.generate(prompt_ids, replace(params, adapter=self.model_name), request_id)

    def cached_prefix_tokens(self, prompt_ids: list[int], prefix: str | None = None) -> int:
        """What the base holds of this prompt computed under this adapter (never the base's blocks)."""
        return self.base.cached_prefix_tokens(prompt_ids, prefix, self.model_name)

    def __getattr__(self, name: str) -> Any:  # the rest of the ChatEngine interface: the base's
        return getattr(self.base, name)
