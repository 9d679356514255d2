"""The prefix cache through the engine: prompt beginnings found in the KV pool are not prefilled again.

The bookkeeping (hash chains, partial-block copies, eviction) and the exact logits after a hit
are tested in test_paged_kv.py; here, on SmolLM2, the engine's answers do not change with the
cache, a wave with one system prompt computes it once, and a conversation reuses its turns.
"""

from __future__ import annotations

import asyncio

from glm_api.engines.base import SamplingParams
from glm_api.engines.kv_blocks import common_length
from glm_api.engines.scheduler import MIN_SHARED_TOKENS
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.registry import PACKAGED_CHAT_NAME
from tests.api.test_metrics import scrape, value
from tests.engines.test_chat_batching import collect


def test_engine_without_a_prefix_cache_when_turned_off(smollm2):
    assert not TransformersChatEngine(smollm2, "m", prefix_cache_tokens=0).kv.prefix_caching
    assert TransformersChatEngine(smollm2, "m").kv.prefix_caching


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
    system_tokens = common_length(prompts[0], prompts[1])
    assert system_tokens > 20
    # Arriving together, the first prompt was prefilled and the others waited one step for its
    # system turn to be in the pool; every later prompt reused it too.
    assert stats.cached_prompt_tokens >= system_tokens * (len(prompts) - 1 + len(prompts) + 1)
    assert plain_stats.cached_prompt_tokens == 0


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
    # Each turn starts after the whole of the turn before it (its prompt and its answer stay in
    # the pool), to the token: turn 3 finds at least all of turn 2's prompt.
    second_prompt = cached_before[1][1]
    assert cached_after - cached_before[2][0] >= second_prompt - 1


def test_metrics_count_cached_prompt_tokens(client):
    before = scrape(client)
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 2, "temperature": 0}
    for _ in range(3):  # the second and the third start after the first's prompt
        assert client.post("/chat", json=chat).status_code == 200
    after = scrape(client)
    model = {"model": PACKAGED_CHAT_NAME}
    moved = value(after, "glm_api_chat_cached_prompt_tokens_total", **model) - value(before, "glm_api_chat_cached_prompt_tokens_total", **model)
    assert moved >= 2 * MIN_SHARED_TOKENS
