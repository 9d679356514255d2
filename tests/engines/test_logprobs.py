"""Log-probabilities in the paged chat engine, on a tiny random Llama (real model, no mocks).

Every figure is compared with a stock transformers forward of the same model (its own SDPA
attention, no engine): the log_softmax of its logits at each position. The engine runs with
prefill chunks smaller than the prompts, rows that hit the prefix cache beside rows that score
their prompt in the same step, and rows batched together; each must give what it gives alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from glm_api.engines.base import GenerationChunk, SamplingParams
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.engines.sequence import Sequence
from glm_api.families.detect import load_chat_model

CPU = torch.device("cpu")
TOL = 1e-4  # float32, 2 layers: paged attention against SDPA
CHUNK = 16  # prefill chunk tokens: smaller than the prompts below


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    return load_chat_model(tiny_llama_dir, CPU, torch.float32, tmp_path_factory.mktemp("cache"))


@pytest.fixture
def engine(tiny):
    engine = TransformersChatEngine(tiny, "tiny", max_running=8, prefill_chunk_tokens=CHUNK, kv_block_size=16)
    engine.start()
    yield engine
    engine.stop()


@dataclass
class Run:
    ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    cached_tokens: int = 0
    chunks: list[GenerationChunk] = field(default_factory=list)


async def run(engine, prompt: list[int], params: SamplingParams, request_id: str) -> Run:
    out = Run()
    async for chunk in engine.generate(prompt, params, request_id):
        out.chunks.append(chunk)
        out.ids += chunk.token_ids
        out.logprobs += chunk.logprobs or []
        if chunk.prompt_logprobs is not None:
            assert out.prompt_logprobs is None  # sent once
            out.prompt_logprobs = chunk.prompt_logprobs
        out.finish_reason, out.cached_tokens = chunk.finish_reason, chunk.cached_tokens
    return out


@torch.inference_mode()
def reference(model, ids: list[int]) -> torch.Tensor:
    """Row p: log_softmax of a stock forward's logits at position p (it predicts token p + 1)."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_scored(prompt_logprobs, prompt: list[int], ref: torch.Tensor, top: int) -> None:
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        lp = prompt_logprobs[p]
        assert lp.token_id == prompt[p]
        assert lp.logprob == pytest.approx(ref[p - 1, prompt[p]].item(), abs=TOL), p
        best = ref[p - 1].topk(top)
        assert [i for i, _ in lp.top] == best.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=TOL)


def assert_generated(logprobs, prompt: list[int], ids: list[int], ref: torch.Tensor, top: int) -> None:
    assert [lp.token_id for lp in logprobs] == ids
    for k, lp in enumerate(logprobs):
        row = ref[len(prompt) - 1 + k]
        assert lp.logprob == pytest.approx(row[ids[k]].item(), abs=TOL), k
        assert [v for _, v in lp.top] == pytest.approx(row.topk(top).values.tolist(), abs=TOL)


def prompts(tiny) -> list[list[int]]:
    encode = tiny.template.encode
    shared = encode("A long shared system prompt that many requests begin with, so that it fills blocks. " * 2)
    return [
        shared + encode(" First question about bread?"),
        shared + encode(" Second question, about cheese and wine, somewhat longer than the first one?"),
        encode("A short prompt."),
    ]


def test_prompt_logprobs_across_chunks_beside_prefix_cache_hits(engine, tiny):
    """One step holds a row that finds its beginning in the prefix cache and rows that score
    their prompts; the scored prompts are longer than a prefill chunk."""
    first, second, short = prompts(tiny)
    assert len(first) > 2 * CHUNK and len(second) > 2 * CHUNK
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    scored = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=3)

    async def scenario():
        await run(engine, first, greedy, "warm")  # the shared beginning is now in the pool
        return await asyncio.gather(
            run(engine, second, greedy, "hit"),
            run(engine, first, scored, "scored-first"),
            run(engine, second, scored, "scored-second"),
            run(engine, short, scored, "scored-short"),
        )

    hit, *scored_runs = asyncio.run(scenario())
    assert hit.cached_tokens >= CHUNK and hit.prompt_logprobs is None and hit.logprobs == []
    for prompt, out in zip((first, second, short), scored_runs):
        assert out.cached_tokens == 0  # a scored prompt computes every position
        ref = reference(tiny.model, prompt + out.ids)
        assert_scored(out.prompt_logprobs, prompt, ref, 3)
        assert_generated(out.logprobs, prompt, out.ids, ref, 2)
        assert out.chunks[0].prompt_logprobs is not None  # with the first chunk
    # The scored rows' full blocks went into the prefix cache: the same prompt hits it now.
    again = asyncio.run(run(engine, first, greedy, "again"))
    assert again.cached_tokens >= CHUNK and again.ids == scored_runs[0].ids


def test_batched_logprobs_equal_the_row_alone(engine, tiny):
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=4)

    async def scenario():
        alone = [await run(engine, p, params, f"alone-{i}") for i, p in enumerate(prompts(tiny))]
        together = await asyncio.gather(*[run(engine, p, params, f"batch-{i}") for i, p in enumerate(prompts(tiny))])
        return alone, together

    alone, together = asyncio.run(scenario())
    for prompt, a, b in zip(prompts(tiny), alone, together):
        assert a.ids == b.ids
        assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-5)
        assert [[i for i, _ in lp.top] for lp in a.logprobs] == [[i for i, _ in lp.top] for lp in b.logprobs]
        assert_generated(b.logprobs, prompt, b.ids, reference(tiny.model, prompt + b.ids), 4)


def test_logprobs_are_the_raw_distribution_not_the_sampled_one(engine, tiny):
    """Temperature 0.5, a repetition penalty and a presence penalty shape the sampling; the
    reported figures are the stock log_softmax of the logits for the tokens taken."""
    prompt = prompts(tiny)[2]
    params = SamplingParams(
        max_tokens=8, temperature=0.5, seed=3, repetition_penalty=1.5, presence_penalty=1.0, logprobs=3
    )
    out = asyncio.run(run(engine, prompt, params, "sampled"))
    ref = reference(tiny.model, prompt + out.ids)
    assert_generated(out.logprobs, prompt, out.ids, ref, 3)
    # The distribution sampled from differs (the test can tell them apart).
    rows = ref[len(prompt) - 1 : len(prompt) - 1 + len(out.ids)]
    tempered = torch.log_softmax(rows * 2.0, dim=-1)
    gaps = [abs(tempered[k, t].item() - out.logprobs[k].logprob) for k, t in enumerate(out.ids)]
    assert max(gaps) > 0.01


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(engine, tiny):
    prompt = prompts(tiny)[1]
    out = asyncio.run(run(engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=0), "score"))
    assert out.ids == [] and out.finish_reason == "length" and len(out.chunks) == 1
    assert_scored(out.prompt_logprobs, prompt, reference(tiny.model, prompt), 0)
    assert engine.num_running == 0 and engine.kv.num_used == 0  # its blocks went back


def test_rows_without_logprobs_compute_nothing_for_them(tiny):
    """The runner returns one row of logits per sampling sequence, unless a sequence scores its
    prompt; the sampler gives no logprobs to rows that did not ask."""
    engine = TransformersChatEngine(tiny, "tiny", max_running=2, prefill_chunk_tokens=64)
    prompt = prompts(tiny)[0]
    plain = Sequence(list(prompt))
    plain.block_table = engine.kv.blocks.allocate(engine.kv.blocks_for(len(prompt)))[0]
    out = engine.runner.execute([(plain, len(prompt))])
    assert out.logits.shape[0] == 1 and out.scored == {}
    scoring = Sequence(list(prompt), block_table=plain.block_table, scores_prompt=True)
    out = engine.runner.execute([(scoring, len(prompt))])
    assert out.logits.shape[0] == 1 and out.scored[0].shape[0] == len(prompt)
    assert torch.equal(out.scored[0][-1], out.logits[0])
