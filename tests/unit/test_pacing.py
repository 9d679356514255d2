"""The prefill pacer: prompt chunks beside decoding rows take a bounded share of time and steps."""

from __future__ import annotations

from glm_api.engines.pacing import FIRST_CHUNK_TOKENS, MIN_CHUNK_TOKENS, PrefillPacer


def test_without_decoding_rows_prompts_get_full_chunks():
    pacer = PrefillPacer(512, time_share=0.2, step_seconds=0.5)
    pacer.observe(2.0, 512, 0)
    assert pacer.budget(decoding=False) == 512


def test_beside_decoding_rows_chunks_are_sized_to_the_step_time_and_spaced_by_the_share():
    pacer = PrefillPacer(512, time_share=0.2, step_seconds=0.5)
    assert pacer.budget(decoding=True) == FIRST_CHUNK_TOKENS  # cost not measured yet: small
    pacer.observe(0.1, 0, 8)  # a decode-only step: 0.1 s
    pacer.observe(0.1 + 64 * 0.004, 64, 8)  # 64 prompt tokens added 4 ms each
    assert pacer.budget(decoding=True) == 0  # the chunk added more than a fifth of the time
    steps = 0
    while pacer.budget(decoding=True) == 0:
        pacer.observe(0.1, 0, 8)
        steps += 1
    assert 3 <= steps <= 30  # decode-only steps until chunks are back under their share
    assert pacer.budget(decoding=True) == int((0.5 - 0.1) / 0.004)  # fills the step to ~0.5 s
    pacer.observe(0.1 + 100 * 1.0, 100, 8)  # a prompt token now costs a second: the floor holds
    for _ in range(500):
        pacer.observe(0.1, 0, 8)
    assert pacer.budget(decoding=True) == MIN_CHUNK_TOKENS


def test_share_one_turns_pacing_off():
    pacer = PrefillPacer(512, time_share=1.0)
    pacer.observe(5.0, 512, 8)
    assert pacer.budget(decoding=True) == 512


def test_one_cheap_step_does_not_size_the_next_chunk_long():
    """The bound on the streams' pause rests on the cost estimate: a step that came out cheap by
    chance (a quarter of the usual cost per token) may stretch the next chunk's step a little,
    never double it."""
    pacer = PrefillPacer(512, time_share=1.0 - 1e-9, step_seconds=0.5)
    pacer.observe(0.1, 0, 8)
    pacer.observe(0.1 + 64 * 0.004, 64, 8)  # 4 ms a prompt token
    steady = pacer.budget(decoding=True)
    pacer.observe(0.1 + steady * 0.001, steady, 8)  # the same chunk, by chance at 1 ms a token
    stretched = pacer.budget(decoding=True)
    assert steady == int(0.4 / 0.004)
    assert stretched * 0.004 + 0.1 <= 0.5 * 1.3  # its real cost: within 30% of the target step
