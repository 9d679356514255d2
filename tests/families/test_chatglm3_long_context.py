"""chatglm3-6b-32k's long context: 32768 positions, rope base 10000 * rope_ratio 50.

The 32k model differs from the 6B only in config (seq_length, rope_ratio), so a tiny checkpoint
with those values, checked against the reference forward pass over a 2400-token prompt (the
reference's float64 attention matrices limit the length), shows the rope base is mapped; the
engine then serves a prompt longer than the 6B's whole 8192-token context, and a 20k-token
prompt prefilled in chunks beside short rows, preempted and recomputed, keeps every row's
logits.
"""

from __future__ import annotations

import asyncio
import copy
import random

import pytest
import torch

from glm_api.engines.base import SamplingParams
from glm_api.engines.paged_attention import install
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.families.chatglm3 import load_chatglm3
from tests.fixtures.chatglm_reference import raw_checkpoint, reference_logits
from tests.engines.test_paged_kv import _Harness, _Row
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


def test_a_20k_prompt_prefilled_in_chunks_beside_short_rows_and_preempted_keeps_every_rows_logits(folder_32k):
    """The 32k model's use: a 20k-token prompt arrives in 512-token chunks while short rows
    decode beside it. The pool is too small for all of them to grow, so the long row (the
    newest) is preempted and recomputed; every row still gets the logits it has alone."""
    reference = load_chatglm3(folder_32k, CPU, torch.float32).model
    model = copy.deepcopy(reference)
    install(model)
    rng = random.Random(5)
    vocab = reference.config.vocab_size
    short = [[rng.randrange(vocab) for _ in range(rng.randint(20, 60))] for _ in range(4)]
    rows = [_Row(ids + [rng.randrange(vocab) for _ in range(120)], len(ids), join=0) for ids in short]
    long_prompt = [rng.randrange(vocab) for _ in range(20_000)]
    rows.append(_Row(long_prompt + [rng.randrange(vocab) for _ in range(100)], len(long_prompt), join=1))
    # Room to admit the long prompt beside the short ones (with the scheduler's 1% reserve),
    # not for all the rows' growth too: the short rows preempt it, the newest, as they grow.
    usable, reserve = sum(-(-len(ids) // 16) for ids in short) + 20_000 // 16 + 2, 0
    while (usable + reserve) // 100 != reserve:
        reserve = (usable + reserve) // 100
    blocks = usable + reserve + 1
    harness = _Harness(model, blocks=blocks, block_size=16, chunk=512)
    harness.run(rows)
    assert harness.scheduler.preemptions >= 1
    with torch.inference_mode():
        for row in rows[:4]:
            expected = reference(input_ids=torch.tensor([row.full])).logits[0]
            got = torch.stack([row.seen[p] for p in range(len(row.full) - 121, len(row.full))])
            torch.testing.assert_close(got, expected[-121:], atol=2e-5, rtol=1e-4)
        long_row = rows[4]
        # Alone: the whole sequence in one pass of the model's stock attention.
        expected = reference(input_ids=torch.tensor([long_row.full]), logits_to_keep=101).logits[0]
        got = torch.stack([long_row.seen[p] for p in range(len(long_row.full) - 101, len(long_row.full))])
        torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)
