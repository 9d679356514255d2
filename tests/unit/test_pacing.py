"""The prefill pacer: prompt chunks beside decoding rows take a bounded share of time and steps."""

from __future__ import annotations

from glm_api.engines.pacing import FIRST_CHUNK_TOKENS, MIN_CHUNK_TOKENS, PrefillPacer


def test_alone_a_long_prompt_gets_the_engine_in_steps_a_newcomer_can_wait_through():
    """Nothing competing: no share applies, but a chunk is sized so its step lasts about
    ``step_seconds`` (a request arriving mid-step waits for that step to end)."""
    pacer = PrefillPacer(512, time_share=0.2, step_seconds=0.5)
    assert pacer.budget(competing=False) == 512  # nothing measured yet
    pacer.observe(0.5, 512, 0)  # a cheap prompt token (1 ms): the full chunk fits in the step
    assert pacer.budget(competing=False) == 512
    pacer.observe(2.0, 512, 0)  # at a longer context a token costs 3.9 ms: a quarter of a chunk
    assert pacer.budget(competing=False) == 128
    for _ in range(100):
        pacer.observe(2.0, 512, 0)  # the whole time on a long prompt: no share holds it back
    assert pacer.budget(competing=False) == 128


def test_short_prompts_prefill_does_not_count_against_a_long_prompts_share():
    pacer = PrefillPacer(512, time_share=0.2, step_seconds=0.5)
    pacer.observe(0.1, 0, 8)
    for _ in range(50):  # every step carries short prompts (none long) beside the decoding rows
        pacer.observe(0.4, 300, 8, long_tokens=0)
    assert pacer.budget(competing=True) > 0
    for _ in range(20):  # the same steps' tokens from a long prompt: over its share
        pacer.observe(0.4, 300, 8)
    assert pacer.budget(competing=True) == 0


def test_beside_decoding_rows_chunks_are_sized_to_the_step_time_and_spaced_by_the_share():
    pacer = PrefillPacer(512, time_share=0.2, step_seconds=0.5)
    assert pacer.budget(competing=True) == FIRST_CHUNK_TOKENS  # cost not measured yet: small
    pacer.observe(0.1, 0, 8)  # a decode-only step: 0.1 s
    pacer.observe(0.1 + 64 * 0.004, 64, 8)  # 64 prompt tokens added 4 ms each
    assert pacer.budget(competing=True) == 0  # the chunk added more than a fifth of the time
    steps = 0
    while pacer.budget(competing=True) == 0:
        pacer.observe(0.1, 0, 8)
        steps += 1
    assert 3 <= steps <= 30  # decode-only steps until chunks are back under their share
    assert pacer.budget(competing=True) == int((0.5 - 0.1) / 0.004)  # fills the step to ~0.5 s
    pacer.observe(0.1 + 100 * 1.0, 100, 8)  # a prompt token now costs a second: the floor holds
    for _ in range(500):
        pacer.observe(0.1, 0, 8)
    assert pacer.budget(competing=True) == MIN_CHUNK_TOKENS


def test_share_one_turns_pacing_off():
    pacer = PrefillPacer(512, time_share=1.0)
    pacer.observe(5.0, 512, 8)
    assert pacer.budget(competing=True) == 512


def test_one_cheap_step_does_not_size_the_next_chunk_long():
    """The bound on the streams' pause rests on the cost estimate: a step that came out cheap by
    chance (a quarter of the usual cost per token) may stretch the next chunk's step a little,
    never double it."""
    pacer = PrefillPacer(512, time_share=1.0 - 1e-9, step_seconds=0.5)
    pacer.observe(0.1, 0, 8)
    pacer.observe(0.1 + 64 * 0.004, 64, 8)  # 4 ms a prompt token
    steady = pacer.budget(competing=True)
    pacer.observe(0.1 + steady * 0.001, steady, 8)  # the same chunk, by chance at 1 ms a token
    stretched = pacer.budget(competing=True)
    assert steady == int(0.4 / 0.004)
    assert stretched * 0.004 + 0.1 <= 0.5 * 1.3  # its real cost: within 30% of the target step
