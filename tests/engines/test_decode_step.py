"""The decode step (issue 24): decode-only steps through the lean path, eager, compiled
(``torch.compile``), and over static buffers as a captured CUDA graph sees them, give every row
the logits it gets alone; a steady decode does not recompile; the settings reach the engine.

The parity runs reuse the paged-KV harness (the engine's scheduler, KV cache manager and model
runner over real tiny models) and compare with each sequence run alone through transformers'
stock attention.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from glm_api.cli import settings_from_args
from glm_api.engines.base import SamplingParams
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.engines.decode_step import DecodeRows, bucket_for, decode_options, row_buckets
from glm_api.engines.kv_blocks import NULL_BLOCK
from glm_api.engines.sequence import Sequence
from glm_api.families.detect import load_chat_model
from tests.engines.test_paged_kv import _assert_alone, _Harness, _random_rows, _stock_and_paged

pytest_plugins = ["tests.fixtures.tiny_causal_lm"]
CPU = torch.device("cpu")

MODES = {
    "eager": {},
    "static buffers (the CUDA graph path, no capture)": {"decode_graphs": True},
    "compiled": {"compile_decode": True},
}


def test_rows_are_padded_to_a_few_buckets():
    assert row_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert row_buckets(12) == (1, 2, 4, 8, 12)
    assert [bucket_for(n, row_buckets(32)) for n in (1, 3, 9, 17, 32)] == [1, 4, 16, 32, 32]


def test_a_step_s_block_tables_hold_each_row_s_blocks_then_the_null_block():
    rng = random.Random(3)
    rows = []
    for i in range(7):
        table = [rng.randrange(1, 10_000) for _ in range(rng.randint(1, 40))]
        rows.append((table, rng.randrange(len(table) * 16), i))
    host = DecodeRows.build(rows, 8, 16)  # one padding row
    tables = host.table_tensor(45)
    assert tables.dtype == torch.long and tables.shape == (8, 45)
    for row, blocks in zip(tables.tolist(), host.tables):
        assert row == blocks + [NULL_BLOCK] * (45 - len(blocks))
    assert host.tables[0] == [NULL_BLOCK] and min(map(len, host.tables[1:])) < 45


def test_settings_pick_compile_and_graphs_per_device():
    cuda, cpu = torch.device("cuda"), CPU
    assert decode_options("auto", "auto", cuda) == (True, True)
    assert decode_options("auto", "auto", cpu) == (False, False)
    assert decode_options("on", "auto", cpu) == (True, False)  # graphs are CUDA's only
    assert decode_options("off", "off", cuda) == (False, False)
    settings = settings_from_args(["--compile-decode", "on", "--cuda-graphs", "off"])
    assert (settings.compile_decode, settings.cuda_graphs) == ("on", "off")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["llama", "glm"])
def test_decode_steps_see_what_each_row_sees_alone(kind, mode):
    reference, model = _stock_and_paged(kind)
    rows, lens = _random_rows(random.Random(4), 10)
    harness = _Harness(model, blocks=200, block_size=4, chunk=64, max_running=8, **MODES[mode])
    assert harness.runner.decode.direct is not None  # both layouts decode without transformers' forward
    harness.run(rows)
    _assert_alone(reference, rows, lens)
    assert harness.runner.decode.steps > 10  # the decode path ran, not only the general step
    assert harness.kv.num_used == 0


@pytest.mark.parametrize("kind", ["glm4_moe_lite", "glm_moe_dsa"])
def test_latent_and_indexer_layouts_keep_the_general_step(kind):
    reference, model = _stock_and_paged(kind)
    rows, lens = _random_rows(random.Random(4), 6)
    harness = _Harness(model, blocks=200, block_size=4, chunk=64, max_running=8)
    assert harness.runner.decode is None  # their layers read a history the pool rebuilds
    harness.run(rows)
    _assert_alone(reference, rows, lens)


def test_a_row_that_scores_its_prompt_keeps_the_general_step():
    """A one-token step of a scoring row must still return that position's logits in ``scored``."""
    _, model = _stock_and_paged("llama")
    harness = _Harness(model, blocks=50, block_size=4, chunk=64, max_running=4)
    runner = harness.runner
    prompt = [5, 9, 11, 3, 7]
    seq = Sequence(list(prompt), scores_prompt=True)
    seq.block_table = harness.kv.blocks.allocate(harness.kv.blocks_for(len(prompt)))[0]
    with torch.inference_mode():
        first = runner.execute([(seq, len(prompt) - 1)])
        seq.num_computed_tokens = len(prompt) - 1
        steps = runner.decode.steps
        last = runner.execute([(seq, 1)])
    assert runner.decode.steps == steps  # not the lean step
    assert first.scored[0].shape[0] == len(prompt) - 1 and last.scored[0].shape[0] == 1
    torch.testing.assert_close(last.scored[0][0], last.logits[0])


def test_preempted_rows_decode_to_the_same_logits_compiled():
    reference, model = _stock_and_paged("llama")
    rows, lens = _random_rows(random.Random(2), 10)
    harness = _Harness(model, blocks=24, block_size=4, chunk=16, max_running=8, compile_decode=True)
    harness.run(rows)
    assert harness.scheduler.preemptions > 0
    _assert_alone(reference, rows, lens)


def test_a_steady_decode_after_warm_up_does_not_recompile():
    from torch._dynamo.utils import counters

    _, model = _stock_and_paged("llama")
    harness = _Harness(model, blocks=200, block_size=4, chunk=64, max_running=8, compile_decode=True)
    harness.runner.decode.warm_up()
    compiled = counters["stats"]["unique_graphs"]
    rows, _ = _random_rows(random.Random(5), 12)  # 1 to 8 rows at a time, lengths 2 to 52
    harness.run(rows)
    assert harness.runner.decode.steps > 10
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.fixture(scope="module")
def tiny_chat(tiny_llama_dir, tmp_path_factory):
    return load_chat_model(tiny_llama_dir, CPU, torch.float32, tmp_path_factory.mktemp("cache"))


def _greedy(engine, prompts, together: bool) -> list[list[int]]:
    async def one(prompt, i):
        ids = []
        async for chunk in engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0), f"r{i}"):
            ids += chunk.token_ids
        return ids

    async def run():
        if together:
            return await asyncio.gather(*[one(p, i) for i, p in enumerate(prompts)])
        return [await one(p, i) for i, p in enumerate(prompts)]

    return asyncio.run(run())


def test_the_engine_compiled_answers_as_eager_alone_and_batched(tiny_chat):
    prompts = [tiny_chat.template.encode_messages([{"role": "user", "content": "x" * n}]) for n in (1, 9, 30, 70)]
    eager = TransformersChatEngine(tiny_chat, "tiny", max_running=4)
    compiled = TransformersChatEngine(tiny_chat, "tiny", max_running=4, compile_decode=True)
    assert compiled.runner.decode.compiled and compiled.runner.decode.steps >= 3  # warmed up: buckets 1, 2, 4
    answers = []
    for engine in (eager, compiled):
        engine.start()
        try:
            answers += [_greedy(engine, prompts, together=False), _greedy(engine, prompts, together=True)]
        finally:
            engine.stop()
    assert all(a == answers[0] for a in answers)
    assert all(len(ids) > 1 for ids in answers[0])
