"""P-Tuning v2 prefixes through the engine equal ChatGLM3's own forward with its prefix encoder.

The reference (``reference_prompt`` below, ChatGLM's forward in tests/fixtures/chatglm_reference.py)
is written from THUDM's modeling_chatglm.py, on the raw checkpoint tensors in float64, sharing no
code with the server: ``get_prompt`` runs the prefix encoder over
``arange(pre_seq_len)``, views it as ``(batch, pre_seq_len, num_layers * 2, groups, kv_channels)``,
permutes to ``[2, 1, 0, 3, 4]`` and splits by 2, so layer i's past keys/values are slices 2i and
2i + 1; each layer concatenates them before its own rotary-embedded keys (no rotary on them);
the mask over them is all ones; the real tokens' position ids are ``arange(seq)`` from 0.

The engine side is the real one: the tiny ChatGLM3 loaded by the server's loader, a
:class:`TransformersChatEngine` with prefixes pinned by ``pin_prefix`` from the server's prefix
encoder code, and its scheduler, KV cache manager and model runner stepping rows fed
predetermined tokens (so each position's logits are compared), beside base-model rows.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import deque
from pathlib import Path

import pytest
import torch

from glm_api.engines.base import SamplingParams
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.engines.sequence import Sequence
from glm_api.families.chatglm3 import load_chatglm3
from glm_api.families.chatglm3.prefix_encoder import load_prefix_weights, prefix_key_values, read_ptuning_config
from tests.fixtures.chatglm3_ptuning import build_ptuning
from tests.fixtures.chatglm_reference import raw_checkpoint, reference_greedy, reference_logits

CPU = torch.device("cpu")


# -- the reference: ChatGLM3's own computation -------------------------------------------------


def reference_prompt(config: dict, prefix: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``ChatGLMModel.get_prompt`` for a batch of one: per layer (keys, values) ``[P, groups, d]``."""
    p = "transformer.prefix_encoder."
    pre_seq_len = config["pre_seq_len"]
    tokens = torch.arange(pre_seq_len)[None]  # prefix_tokens.unsqueeze(0).expand(1, -1)
    past = torch.nn.functional.embedding(tokens, prefix[p + "embedding.weight"])
    if config["prefix_projection"]:
        h = torch.tanh(past @ prefix[p + "trans.0.weight"].T + prefix[p + "trans.0.bias"])
        past = h @ prefix[p + "trans.2.weight"].T + prefix[p + "trans.2.bias"]
    past = past.view(1, pre_seq_len, config["num_layers"] * 2, config["multi_query_group_num"], config["kv_channels"])
    pairs = past.permute([2, 1, 0, 3, 4]).split(2)  # [2, P, 1, groups, d] per layer
    return [(pair[0][:, 0], pair[1][:, 0]) for pair in pairs]


def raw_prefix(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((folder / "config.json").read_text())
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    return config, {k: v.to(torch.float64) for k, v in weights.items()}


# -- fixtures ------------------------------------------------------------------------------------

# Three prefixes: 6 positions without projection (not a multiple of the block size 4: padded),
# 8 with the MLP (exactly two blocks), 5 with the MLP.
PREFIXES = {"plain6": (6, False), "mlp8": (8, True), "mlp5": (5, True)}


@pytest.fixture(scope="module")
def ptuned(tmp_path_factory, tiny_chatglm3_dir):
    folders = {
        name: build_ptuning(tmp_path_factory.mktemp(name), tiny_chatglm3_dir, pre_seq_len=n, projection=proj, seed=i)
        for i, (name, (n, proj)) in enumerate(PREFIXES.items())
    }
    config, weights = raw_checkpoint(tiny_chatglm3_dir)
    prompts = {name: reference_prompt(*raw_prefix(folder)) for name, folder in folders.items()}
    return folders, config, weights, prompts


def make_engine(base: Path, folders: dict[str, Path], *, kv_cache_tokens: int, block_size: int = 4,
                prefix_cache_tokens: int = 0, chunk: int = 512, max_running: int = 32) -> TransformersChatEngine:
    loaded = load_chatglm3(base, CPU, torch.float32)
    engine = TransformersChatEngine(
        loaded, "base", kv_cache_tokens=kv_cache_tokens, kv_block_size=block_size,
        prefix_cache_tokens=prefix_cache_tokens, prefill_chunk_tokens=chunk, max_running=max_running,
        prefill_time_share=1.0,
    )
    for name, folder in folders.items():
        cfg = read_ptuning_config(folder)
        engine.pin_prefix(name, prefix_key_values(load_prefix_weights(folder, cfg), cfg, torch.float32, CPU))
    return engine


class Row:
    def __init__(self, ids: list[int], prompt_len: int, join: int, prefix: str | None) -> None:
        self.full, self.join, self.prefix = ids, join, prefix
        self.prompt_len = prompt_len
        self.seq: Sequence | None = None
        self.seen: dict[int, torch.Tensor] = {}


class Harness:
    """The engine's scheduler, KV cache manager and runner stepping rows fed their tokens."""

    def __init__(self, engine: TransformersChatEngine) -> None:
        self.engine = engine
        self.running: list = []
        self.waiting: deque = deque()

    def add(self, row: Row) -> None:
        prefix = self.engine.prefixes[row.prefix] if row.prefix else None
        row.seq = Sequence(list(row.full[: row.prompt_len]), prefix=prefix, cache_salt=prefix.salt if prefix else None)
        row.priority = 0
        self.waiting.append(row)

    @torch.inference_mode()
    def step(self) -> None:
        e = self.engine
        plan = e.scheduler.schedule(self.running, self.waiting)
        if not plan.scheduled:
            return
        e.kv.apply(e.kv.take_block_ops())
        scheduled = [(row.seq, n) for row, n in plan.scheduled]
        out = e.runner.execute(scheduled)
        e.kv.computed(scheduled)
        for k, logits in zip(out.sampling, out.logits if out.sampling else []):
            row = plan.scheduled[k][0]
            seq = row.seq
            row.seen[seq.num_computed_tokens - 1] = logits.clone()
            if len(seq.token_ids) < len(row.full):
                seq.token_ids.append(row.full[len(seq.token_ids)])
            else:
                self.running.remove(row)
                e.kv.free(seq)

    def run(self, rows: list[Row]) -> None:
        for t in range(3000):
            for r in rows:
                if r.join == t:
                    self.add(r)
            self.step()
            if t > max(r.join for r in rows) and not self.running and not self.waiting:
                return
        raise AssertionError("rows did not finish")


def assert_reference(ptuned, rows: list[Row]) -> None:
    _, config, weights, prompts = ptuned
    for row in rows:
        expected = reference_logits(config, weights, row.full, prompts[row.prefix] if row.prefix else None)
        positions = sorted(row.seen)
        assert positions == list(range(row.prompt_len - 1, len(row.full))), "a position was skipped"
        got = torch.stack([row.seen[p] for p in positions]).to(torch.float64)
        torch.testing.assert_close(got, expected[row.prompt_len - 1 :], atol=2e-4, rtol=1e-4)


def random_rows(rng: random.Random, count: int, names: list[str | None], *, shared: list[int] | None = None,
                vocab: int = 300, joins: int = 12, out_max: int = 10) -> list[Row]:
    rows = []
    for i in range(count):
        prompt = (shared or []) + [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        ids = prompt + [rng.randrange(vocab) for _ in range(rng.randint(1, out_max))]
        rows.append(Row(ids, len(prompt), rng.randint(0, joins), names[i % len(names)]))
    return rows


def _check_pool_after(engine: TransformersChatEngine) -> None:
    """Every row gone: only the pinned blocks are held, each by its pin alone."""
    kv = engine.kv
    assert kv.blocks.num_used == kv.num_pinned
    for prefix in engine.prefixes.values():
        assert all(kv.blocks.blocks[b].refs == 1 for b in prefix.blocks)


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PREFIXES))
def test_a_prefixed_row_alone_equals_chatglm3s_forward_with_its_prefix(ptuned, tiny_chatglm3_dir, name):
    folders = ptuned[0]
    engine = make_engine(tiny_chatglm3_dir, {name: folders[name]}, kv_cache_tokens=256, chunk=5)
    rng = random.Random(7)
    ids = [rng.randrange(300) for _ in range(23)]
    row = Row(ids, 15, 0, name)  # a 15-token prompt in chunks of 5, then 8 decode steps
    Harness(engine).run([row])
    assert_reference(ptuned, [row])
    # It is not the base model's answer: the prefix changed the logits.
    base = reference_logits(ptuned[1], ptuned[2], ids)
    assert not torch.allclose(torch.stack([row.seen[p] for p in sorted(row.seen)]).double(), base[14:], atol=1e-2)
    _check_pool_after(engine)


def test_prefixed_and_base_rows_batched_in_the_same_steps_each_equal_their_reference(ptuned, tiny_chatglm3_dir):
    folders = ptuned[0]
    engine = make_engine(tiny_chatglm3_dir, folders, kv_cache_tokens=800, chunk=16)
    rows = random_rows(random.Random(11), 12, [None, "plain6", "mlp8", "mlp5"])
    harness = Harness(engine)
    steps_mixed = 0
    original_step = harness.step

    def counting_step() -> None:
        nonlocal steps_mixed
        kinds = {r.prefix for r in harness.running}
        steps_mixed += len(kinds) > 2
        original_step()

    harness.step = counting_step
    harness.run(rows)
    assert steps_mixed > 0, "base and prefixed rows never ran in one step"
    assert_reference(ptuned, rows)
    _check_pool_after(engine)


def test_prefix_cache_hits_stay_behind_their_own_prefix_and_equal_the_reference(ptuned, tiny_chatglm3_dir):
    folders = ptuned[0]
    engine = make_engine(tiny_chatglm3_dir, folders, kv_cache_tokens=1200, chunk=64, prefix_cache_tokens=400)
    rng = random.Random(5)
    system = [rng.randrange(300) for _ in range(18)]  # 4 full blocks of 4, then 2 tokens copied
    first = random_rows(rng, 6, ["mlp5", "plain6"], shared=system, joins=0)
    harness = Harness(engine)
    harness.run(first)
    # What the engine (and the replica balancer's affinity) reports is looked up behind the
    # prefix the request names.
    assert engine.cached_prefix_tokens(first[0].full, "mlp5") >= len(system)
    assert engine.cached_prefix_tokens(first[0].full) == engine.cached_prefix_tokens(first[0].full, "mlp8") == 0
    # Then the same system prompt behind the same prefixes, and (once each) behind none and
    # behind a prefix that has not seen it.
    later = random_rows(rng, 6, ["mlp5", "plain6", None, "mlp5", "plain6", "mlp8"], shared=system, joins=2)
    harness.run(later)
    assert_reference(ptuned, first + later)
    cached = {r.prefix: r.seq.num_cached_tokens for r in later}
    assert cached["mlp5"] >= len(system) and cached["plain6"] >= len(system), cached
    assert cached[None] == 0, "a base row found blocks computed behind a prefix"
    assert cached["mlp8"] == 0, "a row found blocks computed behind another prefix"
    _check_pool_after(engine)


def test_preempted_prefixed_rows_are_recomputed_to_the_reference(ptuned, tiny_chatglm3_dir):
    folders = ptuned[0]
    # 25 blocks of 4, 6 of them pinned: too few for 10 rows of up to 40 tokens arriving together.
    engine = make_engine(tiny_chatglm3_dir, folders, kv_cache_tokens=100, chunk=16)
    rows = random_rows(random.Random(2), 10, ["mlp8", None, "plain6", "mlp5"], joins=2, out_max=24)
    Harness(engine).run(rows)
    assert engine.scheduler.preemptions > 0
    assert_reference(ptuned, rows)
    _check_pool_after(engine)


def test_pinned_blocks_are_not_counted_against_requests(ptuned, tiny_chatglm3_dir):
    folders = ptuned[0]
    plain = make_engine(tiny_chatglm3_dir, {}, kv_cache_tokens=120)
    pinned = make_engine(tiny_chatglm3_dir, folders, kv_cache_tokens=120)
    held = sum(len(p.blocks) for p in pinned.prefixes.values())
    assert held == 2 + 2 + 2  # 6 -> 2 blocks of 4 (2 padding slots), 8 -> 2, 5 -> 2 (3 padding)
    assert pinned.kv.num_pinned == held and pinned.kv.num_blocks == plain.kv.num_blocks - held
    assert pinned.row_limit == plain.row_limit - held * 4
    assert [p.hidden for p in pinned.prefixes.values()] == [2, 0, 3]


def test_the_engine_generates_chatglm3s_greedy_tokens_behind_a_prefix(ptuned, tiny_chatglm3_dir):
    folders, config, weights, prompts = ptuned
    engine = make_engine(tiny_chatglm3_dir, folders, kv_cache_tokens=512, prefix_cache_tokens=64)
    engine.start()
    template = engine.template
    prompt = template.encode_messages([{"role": "user", "content": "今天北京的天气怎么样？"}])
    params = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=())

    async def collect(prefix: str | None, request_id: str) -> list[int]:
        ids: list[int] = []
        async for chunk in engine.generate(prompt, params if prefix is None else SamplingParams(
                max_tokens=6, temperature=0.0, prefix=prefix), request_id):
            ids += chunk.token_ids
        return ids

    def greedy(prefix: str | None) -> list[int]:
        return reference_greedy(config, weights, prompt, 6, set(template.stop_token_ids), prompts[prefix] if prefix else None)

    try:
        async def scenario():
            return await asyncio.gather(*[collect(p, f"r{i}") for i, p in enumerate([None, *PREFIXES, "mlp8"])])

        outputs = asyncio.run(scenario())
    finally:
        engine.stop()
    expected = [greedy(p) for p in [None, *PREFIXES, "mlp8"]]
    assert outputs == expected
    assert len({tuple(o) for o in outputs}) > 1  # the prefixes change what is generated
