"""Prompt-prefix caching: what is stored and matched, and that a row prefilled after a stored
prefix sees exactly what it would see run alone (tiny random models, then the packaged SmolLM2
through the engine)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM

from glm_api.engines import prefix_cache
from glm_api.engines.base import SamplingParams
from glm_api.engines.batch_state import BatchState
from glm_api.engines.prefill import compute_prefix, prefill, prefix_of_row
from glm_api.engines.prefix_cache import Prefix, PrefixCache, common_prefix_length
from glm_api.engines.transformers_engine import TransformersChatEngine
from glm_api.registry import PACKAGED_CHAT_NAME
from tests.api.test_metrics import scrape, value
from tests.engines.test_chat_batching import collect

# -- the cache's bookkeeping -----------------------------------------------------------------


def _brute_common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _family(rng: random.Random, count: int) -> list[list[int]]:
    """Prompts over a 3-token alphabet from a few stems: many long shared beginnings."""
    stems = [[rng.randrange(3) for _ in range(rng.randint(0, 30))] for _ in range(4)]
    return [rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randint(1, 30))] for _ in range(count)]


def test_common_prefix_length_matches_a_plain_scan():
    rng = random.Random(1)
    prompts = _family(rng, 60)
    for a in prompts:
        for b in prompts[:20]:
            assert common_prefix_length(a, b) == _brute_common(a, b)
            assert common_prefix_length(tuple(a), tuple(b)) == _brute_common(a, b)


def test_shared_length_is_the_longest_shared_with_a_recent_prompt():
    rng = random.Random(2)
    cache = PrefixCache(max_tokens=1000, min_tokens=1, recent=10)
    seen: list[list[int]] = []
    for prompt in _family(rng, 80):
        recent = seen[-10:]  # older ones were forgotten
        expected = max((_brute_common(prompt[:-1], r[:-1]) for r in recent), default=0)
        assert cache.shared_length(prompt) == expected
        cache.remember(prompt)
        seen.append(prompt)


def test_nothing_longer_than_the_cache_is_kept_or_planned():
    cache = PrefixCache(max_tokens=20, min_tokens=4)
    document = list(range(100, 150))  # 50 shared tokens, more than the cache holds
    cache.remember(document + [1])
    assert cache.shared_length(document + [2]) == 20
    chosen = cache.plan([document + [i] for i in range(4)], lambda tokens, base: Prefix(tokens, []))
    assert all(p.tokens == tuple(document[:20]) for p in chosen) and cache.stored_tokens == 20


def test_match_is_the_longest_stored_beginning_that_leaves_a_token():
    cache = PrefixCache(max_tokens=100, min_tokens=2)
    short, long = Prefix((1, 2), []), Prefix((1, 2, 3, 4), [])
    cache.store(short)
    cache.store(long)
    assert cache.match([1, 2, 3, 4, 5]) is long
    assert cache.match([1, 2, 3, 4]) is short  # the whole prompt is never a prefix: its logits are needed
    assert cache.match([1, 2, 9]) is short
    assert cache.match([2, 1, 3]) is None
    assert cache.match([1]) is None


def test_entries_are_bounded_by_tokens_least_recently_used_first():
    cache = PrefixCache(max_tokens=10, min_tokens=1)
    a, b, c = Prefix((1,) * 4, []), Prefix((2,) * 4, []), Prefix((3,) * 4, [])
    cache.store(a)
    cache.store(b)
    assert cache.match([1] * 6) is a  # a is now the most recently used
    cache.store(c)  # 12 tokens > 10: b goes
    assert cache.stored_tokens == 8 and len(cache) == 2
    assert cache.match([2] * 6) is None and cache.match([1] * 6) is a and cache.match([3] * 6) is c
    cache.store(Prefix((4,) * 11, []))  # longer than the whole cache: not kept
    assert cache.stored_tokens == 8


def test_plan_computes_a_shared_beginning_once_when_it_pays_for_its_pass():
    cache = PrefixCache(max_tokens=1000, min_tokens=4)
    system = list(range(100, 120))  # 20 tokens every prompt begins with
    prompts = [system + [i, i + 1, i + 2] for i in range(4)]
    calls = []

    def compute(tokens, base):
        calls.append((tokens, base))
        return Prefix(tokens, [])

    chosen = cache.plan(prompts, compute)
    assert calls == [(tuple(system), None)]
    assert all(p is chosen[0] and p.tokens == tuple(system) for p in chosen)
    # The next ones find it stored: no pass of their own.
    again = cache.plan([system + [7, 8]], compute)
    assert len(calls) == 1 and again[0] is chosen[0]
    # Two prompts sharing 8 more tokens save 8 tokens once: less than a pass costs.
    more = system + list(range(8))
    assert cache.plan([more + [1], more + [2]], compute) == [chosen[0], chosen[0]]
    assert len(calls) == 1
    # Eight of them save 7 x 8 = 56 tokens: worth a pass, continuing from the stored prefix.
    many = cache.plan([more + [i] for i in range(8)], compute)
    assert calls[-1] == (tuple(more), chosen[0]) and all(p.tokens == tuple(more) for p in many)


def test_plan_gives_each_system_prompt_of_a_mixed_wave_its_own_prefix():
    cache = PrefixCache(max_tokens=1000, min_tokens=4)
    first, second = list(range(100, 120)), list(range(200, 224))
    prompts = [(first if i % 2 else second) + [i, 7, 8] for i in range(8)]
    calls = []

    def compute(tokens, base):
        calls.append(tokens)
        return Prefix(tokens, [])

    chosen = cache.plan(prompts, compute)
    assert sorted(calls) == [tuple(first), tuple(second)]
    assert all(p.tokens == tuple(first if i % 2 else second) for i, p in enumerate(chosen))
    # A lone prompt with a third beginning gets none: there is nothing to share it with.
    assert cache.plan([list(range(300, 330)) + [1], first + [9, 9]], compute)[0] is None


def test_engine_without_a_prefix_cache_when_turned_off(smollm2):
    assert TransformersChatEngine(smollm2, "m", prefix_cache_tokens=0).prefixes is None
    assert TransformersChatEngine(smollm2, "m").prefixes is not None


# -- prefilling after a prefix: exact per row ------------------------------------------------


def _tiny(kind: str):
    torch.manual_seed(0)
    shape = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).eval()
    # GLM: partial rotary (half of each head), interleaved: positions must be exactly right.
    return GlmForCausalLM(GlmConfig(**shape, head_dim=8, pad_token_id=0)).eval()


@pytest.mark.parametrize("kind", ["llama", "glm"])
@torch.inference_mode()
def test_rows_after_different_prefixes_see_what_they_would_alone(kind):
    """One pass over rows with no prefix, a shared one, a longer one continuing it and one copied
    out of another row: every row's logits at the prefill and at later decode steps are those
    of its whole sequence run alone."""
    model = _tiny(kind)
    rng = random.Random(3)
    stem = [rng.randrange(1, 97) for _ in range(9)]
    longer = stem + [rng.randrange(1, 97) for _ in range(5)]
    shared = compute_prefix(model, tuple(stem), None, torch.device("cpu"))
    continued = compute_prefix(model, tuple(longer), shared, torch.device("cpu"))
    prompts = [
        [rng.randrange(1, 97) for _ in range(6)],
        stem + [5],
        stem + [rng.randrange(1, 97) for _ in range(7)],
        longer + [8, 9, 10],
    ]
    prefixes = [None, shared, shared, continued]
    steps = 4
    sequences = [p + [rng.randrange(1, 97) for _ in range(steps)] for p in prompts]
    references = [model(input_ids=torch.tensor([s])).logits[0] for s in sequences]

    logits, cache, mask = prefill(model, prompts, prefixes, torch.device("cpu"))
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[row], references[row][len(prompt) - 1], atol=1e-5, rtol=1e-4)
    copied = prefix_of_row(cache, mask, 2, tuple(stem))
    for (k, v), (k2, v2) in zip(copied.layers, shared.layers):
        torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-4)

    state = BatchState(max_rows=4)
    state.add(cache, mask)
    for step in range(steps):
        last = torch.tensor([[s[len(p) + step]] for s, p in zip(sequences, prompts)])
        positions = torch.tensor([[len(p) + step] for p in prompts])
        out = model(input_ids=last, attention_mask=state.step_mask()[:, None, None, :], position_ids=positions, cache=state.cache)
        state.advance()
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(out.logits[row, -1], references[row][len(prompt) + step], atol=1e-5, rtol=1e-4)


# -- through the engine, on SmolLM2 ----------------------------------------------------------

SYSTEM = "You are a careful assistant for a bakery. Answer briefly, in plain English, and never invent prices."
QUESTIONS = ["What is sourdough?", "Which bread keeps longest?", "Why do croissants have layers?", "Is rye bread sweet?"]


def _run(smollm2, prefix_cache_tokens: int, prompts: list[list[int]]):
    engine = TransformersChatEngine(smollm2, "smollm2", max_running=8, prefix_cache_tokens=prefix_cache_tokens)
    engine.start()
    params = SamplingParams(max_tokens=8, temperature=0.0)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=11)
    try:
        async def scenario():
            together = await asyncio.gather(*[collect(engine, p, params, f"t{i}") for i, p in enumerate(prompts)])
            one_by_one = [await collect(engine, p, params, f"s{i}") for i, p in enumerate(prompts)]
            seeded = await collect(engine, prompts[0], sampled, "seeded")
            return [o.ids for o in together], [o.ids for o in one_by_one], seeded.ids

        return (*asyncio.run(scenario()), engine.stats)
    finally:
        engine.stop()


def test_the_engine_gives_the_same_tokens_with_and_without_prefixes(smollm2):
    prompts = [smollm2.template.encode_messages([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
               for q in QUESTIONS]
    together, one_by_one, seeded, stats = _run(smollm2, 4096, prompts)
    plain_together, plain_one_by_one, plain_seeded, plain_stats = _run(smollm2, 0, prompts)
    assert together == plain_together and one_by_one == plain_one_by_one and seeded == plain_seeded
    assert together == one_by_one
    system_tokens = common_prefix_length(prompts[0], prompts[1])
    assert system_tokens > 20
    # Admitted together, the system turn was prefilled once; then every later prompt reused it.
    assert stats.prefixes_computed == 1
    assert stats.cached_prompt_tokens >= system_tokens * (len(prompts) + len(prompts) + 1)
    assert plain_stats.cached_prompt_tokens == 0 and plain_stats.prefixes_computed == 0


def test_a_conversation_reuses_its_earlier_turns(smollm2):
    engine = TransformersChatEngine(smollm2, "smollm2", max_running=2)
    engine.start()
    params = SamplingParams(max_tokens=6, temperature=0.0)
    try:
        async def scenario():
            messages = [{"role": "user", "content": "Tell me about the moon."}]
            cached_before = []
            for turn in range(3):
                prompt = smollm2.template.encode_messages(messages)
                cached_before.append((engine.stats.cached_prompt_tokens, len(prompt)))
                out = await collect(engine, prompt, params, f"turn-{turn}")
                messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": f"And then {turn}?"}]
            return cached_before, engine.stats.cached_prompt_tokens

        cached_before, cached_after = asyncio.run(scenario())
    finally:
        engine.stop()
    # Turn 2 shares turn 1's prompt (stored after turn 1's prefill... once turn 2 saw it shared),
    # so turn 3 starts after at least all of turn 1's prompt.
    first_prompt = cached_before[0][1]
    assert cached_after - cached_before[2][0] >= first_prompt - 1


def test_metrics_count_cached_prompt_tokens(client):
    before = scrape(client)
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 2, "temperature": 0}
    for _ in range(3):  # the second sees the first's prompt shared, the third starts after it
        assert client.post("/chat", json=chat).status_code == 200
    after = scrape(client)
    model = {"model": PACKAGED_CHAT_NAME}
    moved = value(after, "glm_api_chat_cached_prompt_tokens_total", **model) - value(before, "glm_api_chat_cached_prompt_tokens_total", **model)
    assert moved >= prefix_cache.MIN_PREFIX_TOKENS


@torch.inference_mode()
def test_rows_join_after_learnt_prefixes_and_leave_without_changing_any_rows_logits(monkeypatch):
    """The engine's whole prefill path over time, on a tiny model: prompts from a few stems
    arrive in waves, the cache learns their shared beginnings (copied out of prefills and
    computed for a wave), rows join a batch that is decoding and leave it; every row's logits
    at every step stay those of its sequence run alone."""
    from glm_api.engines import batch_state

    monkeypatch.setattr(batch_state, "COLUMN_CHUNK", 2)  # relayout columns often
    model = _tiny("llama")
    cache = PrefixCache(max_tokens=60, min_tokens=3)  # small: entries are evicted too
    rng = random.Random(11)
    stems = [[rng.randrange(1, 97) for _ in range(rng.randint(4, 12))] for _ in range(3)]
    rows = []
    for _ in range(18):
        prompt = rng.choice(stems) + [rng.randrange(1, 97) for _ in range(rng.randint(1, 6))]
        ids = prompt + [rng.randrange(1, 97) for _ in range(rng.randint(1, 6))]
        rows.append({"ids": ids, "prompt": prompt, "join": rng.randint(0, 14), "fed": 0, "seen": [],
                     "reference": model(input_ids=torch.tensor([ids])).logits[0]})

    def compute(tokens, base):
        return compute_prefix(model, tokens, base, torch.device("cpu"))

    state, running, used = BatchState(max_rows=2), [], 0
    for step in range(40):
        wave = [r for r in rows if r["join"] == step]
        if wave:
            shared = [cache.observe(r["prompt"]) for r in wave]
            prefixes = cache.plan([r["prompt"] for r in wave], compute)
            used += sum(p is not None for p in prefixes)
            logits, group_cache, mask = prefill(model, [r["prompt"] for r in wave], prefixes, torch.device("cpu"))
            for j, r in enumerate(wave):
                r["seen"].append(logits[j])
                if cache.worth_storing(shared[j], prefixes[j]):
                    cache.store(prefix_of_row(group_cache, mask, j, tuple(r["prompt"][: shared[j]])))
            state.add(group_cache, mask)
            running += wave
        done = {i for i, r in enumerate(running) if len(r["prompt"]) + r["fed"] == len(r["ids"])}
        if done:
            running = [running[i] for i in state.remove(done)]
        if not running:
            continue
        last = torch.tensor([[r["ids"][len(r["prompt"]) + r["fed"]]] for r in running])
        positions = torch.tensor([[len(r["prompt"]) + r["fed"]] for r in running])
        out = model(input_ids=last, attention_mask=state.step_mask()[:, None, None, :], position_ids=positions, cache=state.cache)
        state.advance()
        for j, r in enumerate(running):
            r["fed"] += 1
            r["seen"].append(out.logits[j, -1])
    assert state.size == 0 and used >= 6  # prefixes were really used, not just stored
    for r in rows:
        expected = r["reference"][len(r["prompt"]) - 1 :]
        torch.testing.assert_close(torch.stack(r["seen"]), expected, atol=1e-5, rtol=1e-4)
