"""The chat engine over its KV pool: admission by memory, chunked prefill, out-of-memory steps."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from glm_api.engines.base import SamplingParams
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.errors import ContextLengthError, EngineUnavailableError
from tests.engines.test_chat_batching import QUESTIONS, collect


@pytest.fixture(scope="module")
def prompts(smollm2) -> list[list[int]]:
    return [smollm2.template.encode_messages([{"role": "user", "content": q}]) for q in QUESTIONS]


def _long_prompt(smollm2, tokens: int) -> list[int]:
    text = "The lighthouse keeper wrote down the weather, the ships and the birds every hour. " * (tokens // 12)
    return smollm2.template.encode_messages([{"role": "user", "content": text}])[:tokens]


def test_a_prompt_the_pool_cannot_hold_is_a_400_before_anything_starts(smollm2, prompts):
    engine = TransformersChatEngine(smollm2, "smollm2", kv_cache_tokens=64, kv_block_size=16)
    engine.start()
    try:

        async def scenario():
            with pytest.raises(ContextLengthError, match="KV cache"):
                engine.generate(_long_prompt(smollm2, 100), SamplingParams(max_tokens=4, temperature=0.0), "too-long")
            # A short one still runs, and stops at the pool's limit rather than failing.
            return await collect(engine, prompts[0], SamplingParams(max_tokens=200, temperature=0.0), "fits")

        out = asyncio.run(scenario())
    finally:
        engine.stop()
    assert out.finish_reason in {"stop", "length"}
    assert len(prompts[0]) + len(out.ids) <= engine.row_limit


def test_running_streams_keep_flowing_while_a_long_prompt_is_prefilled_in_chunks(smollm2, prompts):
    engine = TransformersChatEngine(smollm2, "smollm2", prefill_chunk_tokens=32)
    engine.start()
    try:

        async def scenario():
            tokens_at: list[int] = []
            stream = engine.generate(prompts[2], SamplingParams(max_tokens=400, temperature=0.0), "running")
            got = 0
            async for chunk in stream:
                got += len(chunk.token_ids)
                if got >= 2:
                    break
            long = engine.generate(_long_prompt(smollm2, 384), SamplingParams(max_tokens=1, temperature=0.0), "long")
            first = asyncio.ensure_future(long.__anext__())
            while not first.done():
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:  # the stream finished first: it never stopped flowing
                    break
                got += len(chunk.token_ids)
                tokens_at.append(got)
            await stream.aclose()
            if not first.done():
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first
            await long.aclose()
            return tokens_at

        tokens_at = asyncio.run(scenario())
    finally:
        engine.stop()
    # 384 tokens in chunks of at most 32 (12 chunks, as 1500 in chunks of 128 were: the pacing's
    # share of the time, not the prompt's length, is what makes it a long prefill; SmolLM2's
    # steps cost about as much at 32 tokens as at 128, so 1500 took ~29 s, 384 take ~17), paced
    # to a share of the time: the running stream gets a token in every step, those with a chunk
    # and those without (measured ~190 of them; a prefill done in one step leaves it 1 or 2).
    assert tokens_at[-1] - tokens_at[0] >= 10, tokens_at


class _OutOfMemoryOnce:
    """The model, except that the first step carrying a prompt chunk beside a decoding row
    raises a device out-of-memory error (what a GPU does when a chunk's activations do not fit)."""

    def __init__(self, model) -> None:
        self._model, self.raised = model, False

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        groups = kwargs["paged_step"].groups
        if not self.raised and any(g.q_len > 1 for g in groups) and any(g.q_len == 1 for g in groups):
            self.raised = True
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return self._model(*args, **kwargs)


def test_an_out_of_memory_step_fails_the_chunked_row_and_the_others_go_on(smollm2, prompts):
    engine = TransformersChatEngine(smollm2, "smollm2")
    engine.runner.model = _OutOfMemoryOnce(smollm2.model)
    engine.start()
    try:

        async def scenario():
            alone = await collect(engine, prompts[0], SamplingParams(max_tokens=12, temperature=0.0), "reference")
            stream = engine.generate(prompts[0], SamplingParams(max_tokens=12, temperature=0.0), "survivor")
            first = await stream.__anext__()
            with pytest.raises(EngineUnavailableError, match="out of device memory"):
                await collect(engine, prompts[2], SamplingParams(max_tokens=4, temperature=0.0), "victim")
            ids = list(first.token_ids)
            async for chunk in stream:
                ids += chunk.token_ids
            after = await collect(engine, prompts[2], SamplingParams(max_tokens=4, temperature=0.0), "after")
            return alone, ids, after

        alone, survivor, after = asyncio.run(scenario())
    finally:
        engine.stop()
    assert engine.model.raised
    assert survivor == alone.ids  # the decoding row lost nothing
    assert after.finish_reason in {"stop", "length"}
    assert engine.kv.num_used == 0
