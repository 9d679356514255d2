"""The paged KV cache: block bookkeeping, and every row's logits equal to the row run alone.

The parity tests drive the engine's own scheduler, KV cache manager and model runner over real
tiny models (the engine's loop adds only sampling and streaming around them): rows join at random steps,
prefill in chunks that cross block edges, decode beside each other, are preempted when the pool
runs short and recomputed, and start after beginnings found in the pool. Each logit vector is
compared with the same sequence run alone through the model's stock attention.
"""

from __future__ import annotations

import copy
import random
from collections import deque

import pytest
import torch
from transformers import (
    Glm4MoeLiteConfig,
    Glm4MoeLiteForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    GlmMoeDsaConfig,
    GlmMoeDsaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from glm_api.engines.cache_layout import probe_layout
from glm_api.engines.kv_blocks import NULL_BLOCK, BlockManager, chain_digest
from glm_api.engines.kv_cache_manager import KVCacheManager
from glm_api.engines.kv_pool import KVPool, KVShape
from glm_api.engines.model_runner import ModelRunner
from glm_api.engines.paged_attention import install
from glm_api.engines.scheduler import Scheduler
from glm_api.engines.sequence import Sequence

CPU = torch.device("cpu")

# -- bookkeeping -----------------------------------------------------------------------------


def test_blocks_are_counted_shared_and_given_back():
    blocks = BlockManager(9, 4, cached_blocks=0)
    assert (blocks.num_blocks, blocks.num_free) == (8, 8)
    first, first_use = blocks.allocate(3)
    assert NULL_BLOCK not in first and first_use == first
    blocks.share(first[:2])
    blocks.release(first)
    assert blocks.num_used == 2  # still referenced once more
    blocks.release(first[:2])
    assert blocks.num_free == 8
    again, first_use = blocks.allocate(8)
    assert sorted(again) == list(range(1, 9)) and sorted(first_use) == sorted(set(again) - set(first))
    assert not blocks.can_allocate(1)
    with pytest.raises(MemoryError):
        blocks.allocate(1)


def _fill(blocks: BlockManager, tokens: list[int]) -> list[int]:
    """A row that computed ``tokens``: its full blocks cached, as the KV cache manager does."""
    table, _ = blocks.allocate(blocks.blocks_for(len(tokens)))
    parent = None
    for i in range(len(tokens) // blocks.block_size):
        parent = blocks.cache_block(table[i], parent, tuple(tokens[i * 4 : i * 4 + 4]))
    return table


def test_lookup_finds_whole_blocks_then_copies_the_longest_partial_match():
    blocks = BlockManager(32, 4, cached_blocks=16)
    system = list(range(100, 110))  # 10 tokens: 2 whole blocks, 2 tokens into the third
    table = _fill(blocks, system + [1, 2, 3, 4, 5, 6])
    blocks.release(table)  # finished: its blocks stay findable
    hit = blocks.lookup(system + [7, 8, 9])
    assert hit.blocks == table[:2] and hit.copy_from == table[2] and hit.copy_tokens == 2
    assert hit.tokens(4) == 10
    # At least one token is always left to compute, even for the very same prompt.
    same = blocks.lookup(system + [1, 2, 3, 4, 5, 6])
    assert same.tokens(4) == 15
    # Blocks chain: the same 4 tokens after another beginning are not a hit.
    assert blocks.lookup([0] * 4 + system[4:8] + [0]).tokens(4) == 0
    assert BlockManager(32, 4, cached_blocks=0).lookup(system + [7]).tokens(4) == 0


def test_cached_blocks_are_bounded_and_taken_back_before_reuse():
    blocks = BlockManager(10, 4, cached_blocks=2)
    a = _fill(blocks, list(range(8)))
    b = _fill(blocks, list(range(50, 58)))
    blocks.release(a)
    blocks.release(b)  # 4 hashed blocks freed, only 2 may stay cached: a's go first
    assert blocks.num_cached == 2 and blocks.num_free == 9
    assert blocks.lookup(list(range(8)) + [99]).tokens(4) == 0
    hit = blocks.lookup(list(range(50, 58)) + [99])
    assert hit.blocks == b
    blocks.share(hit.blocks)
    assert blocks.num_cached == 0 and blocks.num_used == 2
    # Fresh allocations use never-cached blocks before evicting cached ones.
    blocks.release(hit.blocks)
    blocks.allocate(7)
    assert blocks.lookup(list(range(50, 58)) + [99]).tokens(4) == 8


def test_blocks_are_found_by_a_digest_of_their_tokens_chained_to_their_beginning():
    blocks = BlockManager(16, 4, cached_blocks=8)
    a = _fill(blocks, [1, 2, 3, 4, 5, 6, 7, 8])
    first = chain_digest(None, (1, 2, 3, 4))
    assert blocks.blocks[a[0]].digest == first and len(first) == 16
    assert blocks.blocks[a[1]].digest == chain_digest(first, (5, 6, 7, 8)) != chain_digest(None, (5, 6, 7, 8))
    # The same block of tokens after another beginning is another digest: never a hit.
    b = _fill(blocks, [9, 9, 9, 9, 5, 6, 7, 8])
    assert blocks.blocks[b[1]].digest != blocks.blocks[a[1]].digest
    blocks.release(a)
    blocks.release(b)
    assert blocks.lookup([9, 9, 9, 9, 5, 6, 7, 8, 0]).blocks == b
    assert blocks.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0]).blocks == a


# -- parity with the model alone -------------------------------------------------------------


#: Multi-head latent attention, as GLM-4.7-Flash (glm4_moe_lite) and GLM-5 (glm_moe_dsa) lay
#: it out: a compressed latent and a rope key cached, then expanded per head; MoE layers after
#: the first. GLM-5's indexer keeps 6 keys per query (so prompts past 6 tokens attend sparsely);
#: its middle layer reuses the first one's choice ("shared").
LATENT = {
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 12,
    "moe_intermediate_size": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
}
KINDS = ["llama", "glm", "glm4_moe_lite", "glm_moe_dsa"]


def _tiny(kind: str):
    torch.manual_seed(0)
    shape = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).eval()
    if kind == "glm4_moe_lite":
        return Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(**{**shape, "num_key_value_heads": 4}, **LATENT)).eval()
    if kind == "glm_moe_dsa":
        config = GlmMoeDsaConfig(
            **{**shape, "num_hidden_layers": 3, "num_key_value_heads": 4}, **LATENT,
            index_topk=6, index_head_dim=16, index_n_heads=16, index_topk_pattern="FSF",
        )
        return GlmMoeDsaForCausalLM(config).eval()
    # GLM: partial rotary (half of each head), interleaved: positions must be exactly right.
    return GlmForCausalLM(GlmConfig(**shape, head_dim=8, pad_token_id=0)).eval()


def _stock_and_paged(kind: str):
    """The same tiny model twice: with transformers' stock attention, and installed for paging."""
    reference = _tiny(kind)
    model = copy.deepcopy(reference)
    install(model)
    return reference, model


class _Row:
    def __init__(self, ids: list[int], prompt_len: int, join: int, priority: int = 0) -> None:
        self.full, self.join, self.priority = ids, join, priority
        self.seq = Sequence(token_ids=list(ids[:prompt_len]))
        self.seen: dict[int, torch.Tensor] = {}  # position -> logits of the next token


class _Harness:
    """The engine's step (scheduler, KV cache manager, model runner) without sampling: each row
    is fed its predetermined tokens."""

    def __init__(
        self, model, *, blocks: int, block_size: int, chunk: int, cached_blocks: int = 0, max_running=64, **runner_options
    ):
        pool = KVPool(probe_layout(model), blocks, block_size, CPU)
        self.runner = ModelRunner(model, pool, max_decode_rows=max_running, **runner_options)
        self.kv = KVCacheManager(self.runner.pool, cached_blocks=cached_blocks)
        self.scheduler = Scheduler(self.kv, max_running=max_running, chunk_tokens=chunk)
        self.running: list[_Row] = []
        self.waiting: deque[_Row] = deque()
        self.steps = 0
        self.victims: list[tuple[_Row, bool]] = []  # preempted, and whether a batch row was running

    @torch.inference_mode()
    def step(self) -> None:
        batch_running = any(r.priority for r in self.running)
        plan = self.scheduler.schedule(self.running, self.waiting)
        self.victims += [(r, batch_running) for r in plan.preempted]
        if not plan.scheduled:
            return
        self.kv.apply(self.kv.take_block_ops())
        scheduled = [(row.seq, n) for row, n in plan.scheduled]
        out = self.runner.execute(scheduled)
        self.kv.computed(scheduled)
        self.steps += 1
        # Logits come only for rows whose last known token was computed (no mid-prompt chunks).
        assert out.sampling == [k for k, (seq, _) in enumerate(scheduled) if seq.num_computed_tokens == len(seq.token_ids)]
        for k, logits in zip(out.sampling, out.logits if out.sampling else []):
            row = plan.scheduled[k][0]
            seq = row.seq
            row.seen[seq.num_computed_tokens - 1] = logits.clone()
            if len(seq.token_ids) < len(row.full):
                seq.token_ids.append(row.full[len(seq.token_ids)])
            else:
                self.running.remove(row)
                self.kv.free(seq)

    def run(self, rows: list[_Row], max_steps: int = 2000) -> None:
        for t in range(max_steps):
            self.waiting.extend(r for r in rows if r.join == t)
            self.step()
            if t > max(r.join for r in rows) and not self.running and not self.waiting:
                return
        raise AssertionError("rows did not finish")


def _assert_alone(reference_model, rows: list[_Row], prompt_lens: list[int]) -> None:
    with torch.inference_mode():
        for row, prompt_len in zip(rows, prompt_lens):
            expected = reference_model(input_ids=torch.tensor([row.full])).logits[0]
            positions = sorted(row.seen)
            assert positions == list(range(prompt_len - 1, len(row.full))), "a position was skipped"
            torch.testing.assert_close(
                torch.stack([row.seen[p] for p in positions]), expected[prompt_len - 1 :], atol=2e-5, rtol=1e-4
            )


def _random_rows(rng: random.Random, count: int, *, shared: list[int] | None = None) -> tuple[list[_Row], list[int]]:
    rows, lens = [], []
    for _ in range(count):
        prompt = (shared or []) + [rng.randrange(97) for _ in range(rng.randint(1, 40))]
        ids = prompt + [rng.randrange(97) for _ in range(rng.randint(1, 12))]
        rows.append(_Row(ids, len(prompt), join=rng.randint(0, 15)))
        lens.append(len(prompt))
    return rows, lens


@pytest.mark.parametrize("kind", KINDS)
def test_rows_joining_chunked_and_leaving_see_what_they_see_alone(kind):
    reference, model = _stock_and_paged(kind)
    rows, lens = _random_rows(random.Random(1), 12)
    harness = _Harness(model, blocks=200, block_size=4, chunk=7)
    harness.run(rows)
    _assert_alone(reference, rows, lens)
    assert harness.kv.num_used == 0


@pytest.mark.parametrize("kind", KINDS)
def test_preempted_rows_are_recomputed_to_the_same_logits(kind):
    reference, model = _stock_and_paged(kind)
    rows, lens = _random_rows(random.Random(2), 10)
    harness = _Harness(model, blocks=24, block_size=4, chunk=16)  # 92 tokens for ~10 rows of up to 52
    harness.run(rows)
    assert harness.scheduler.preemptions > 0
    _assert_alone(reference, rows, lens)


@pytest.mark.parametrize("kind", ["llama", "glm"])
def test_batch_rows_are_preempted_before_interactive_ones_and_recomputed_to_the_same_logits(kind):
    reference, model = _stock_and_paged(kind)
    rows, lens = _random_rows(random.Random(2), 10)
    for row in sorted(rows, key=lambda r: r.join)[: len(rows) // 2]:
        row.priority = 1  # batch lines, there first: the newest rows are interactive ones
    harness = _Harness(model, blocks=24, block_size=4, chunk=16)
    harness.run(rows)
    assert harness.victims, "the pool was never short"
    # While a batch row runs, the victim is always one (even when an interactive row is newer).
    assert all(victim.priority == 1 for victim, batch_running in harness.victims if batch_running)
    assert any(victim.priority == 1 for victim, _ in harness.victims)
    _assert_alone(reference, rows, lens)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_after_beginnings_found_in_the_pool_see_what_they_see_alone(kind):
    reference, model = _stock_and_paged(kind)
    rng = random.Random(3)
    system = [rng.randrange(97) for _ in range(23)]  # ends 3 tokens into a block: copied, not shared
    rows, lens = _random_rows(rng, 12, shared=system)
    harness = _Harness(model, blocks=300, block_size=4, chunk=64, cached_blocks=100)
    harness.run(rows)
    _assert_alone(reference, rows, lens)
    cached = [r.seq.num_cached_tokens for r in rows]
    assert max(cached) >= len(system) and sum(c >= len(system) for c in cached) >= len(rows) // 2, cached


def test_a_model_whose_attention_ignores_the_interface_is_refused():
    class Custom(LlamaForCausalLM):
        _supports_attention_backend = False

    model = Custom(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="attention interface"):
        install(model)
