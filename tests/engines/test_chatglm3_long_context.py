"""chatglm3-6b-32k's long context: 32768 positions, rope base 10000 * rope_ratio 50.

The 32k model differs from the 6B only in config (seq_length, rope_ratio), so a tiny checkpoint
with those values, checked against the reference forward pass over a 2400-token prompt (the
reference's float64 attention matrices limit the length), shows the rope base is mapped; the
engine then serves a prompt longer than the 6B's whole 8192-token context.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from glm_api.engines.base import SamplingParams
from glm_api.engines.transformers_engine import TransformersChatEngine
from glm_api.families.chatglm3 import load_chatglm3
from tests.engines.test_chatglm3_checkpoint import raw_checkpoint, reference_logits
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder_32k(tmp_path_factory):
    return build_tiny_chatglm3(tmp_path_factory.mktemp("chatglm3_32k"), seq_length=32768, rope_ratio=50)


def test_32k_config_maps_to_context_and_rope_base(folder_32k):
    loaded = load_chatglm3(folder_32k, CPU, torch.float32)
    assert loaded.context_length == 32768
    assert loaded.model.config.max_position_embeddings == 32768
    assert loaded.model.config.rope_parameters["rope_theta"] == 500000.0


def test_logits_match_reference_at_long_positions(folder_32k):
    loaded = load_chatglm3(folder_32k, CPU, torch.float32)
    config, weights = raw_checkpoint(folder_32k)
    ids = (loaded.template.encode("今天北京的天气怎么样？The quick brown fox jumps over the lazy dog.") * 200)[:2400]
    expected = reference_logits(config, weights, ids)[-8:]
    with torch.no_grad():
        got = loaded.model(torch.tensor([ids])).logits[0, -8:].double()
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_engine_serves_a_prompt_longer_than_8k(folder_32k):
    loaded = load_chatglm3(folder_32k, CPU, torch.float32)
    prompt = (loaded.template.encode("北京今天晴，气温二十二度。") * 1200)[:9000]

    async def run():
        engine = TransformersChatEngine(loaded, "chatglm3-6b-32k")
        engine.start()
        try:
            chunks = [c async for c in engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0), "long")]
        finally:
            engine.stop()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[-1].finish_reason in {"stop", "length"}
    assert chunks[-1].prompt_tokens == 9000
