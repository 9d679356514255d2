"""How many prompt tokens a step may carry while other sequences are decoding.

Chunked prefill alone stops a long prompt from freezing the streams, but a step that carries a
chunk still lasts as long as the chunk costs, and if every step carries one, every token of
every stream waits for a chunk: measured on 2 CPU cores with SmolLM2, a 6.8k-token prompt in
512-token chunks beside 8 streams made their median gap 17.6x their gap alone (longest 2.5 s),
and 16 short streams ran at 0.24 of their speed alone. So, while any sequence is decoding:

- long prompts' chunks may add at most ``time_share`` to the engine's recent time (a decaying
  average over a few seconds of what steps with prompt tokens took beyond a decode-only step):
  the streams keep at least ``1 - time_share`` of their speed, and their median gap stays near
  their gap alone (either most steps are decode-only, or each chunk adds little);
- a chunk is sized so that its step lasts about ``step_seconds``, from the measured cost of a
  prompt token beside the decode rows (it grows with the prompt's past, so it is re-measured at
  every chunk; a dearer reading is taken at once, a cheaper one only slowly, because a step
  that comes out cheap by chance must not size the next chunk twice too long: one of three
  quiet bench runs had a 1.15 s pause with an even average): no stream waits much longer than
  that for its next token.

Only prompts longer than a chunk are paced (the scheduler's rule): a prompt that fits in one
chunk costs the streams one bounded step, and a burst of short requests must not trickle in.
Short prompts that arrive while a long one prefills count as competing work too (they are about
to decode): they start in the next step, and the long prompt's chunks are paced beside them.

With nothing else running, a long prompt's chunks are still sized to ``step_seconds``: a
request that arrives mid-step waits for that step to end, so a step must stay short (on this
CPU a 512-token chunk at 6k tokens of context lasts ~3 s; on a GPU a full chunk takes tens of
milliseconds, and the cap never binds).

Only long prompts' tokens count against ``time_share``: short prompts' prefill is not the long
prompt's doing, and counting it would let a steady stream of short requests hold a long prompt
back for ever. So the bound on how long a long prompt can be held back: whatever arrives, it
gets about ``time_share`` of the engine's time (a chunk whenever its recent share is below it),
and all of it when nothing competes; its time to first token is at most about its time alone
divided by ``time_share``, plus the other requests' own prefill steps. It belongs to the
engine's worker thread.
"""

from __future__ import annotations

import math

#: The decaying average's time constant: long enough to span several chunks and decode steps.
WINDOW_SECONDS = 4.0
#: A chunk beside decoding rows is never smaller than this (progress) nor, before its cost is
#: measured, larger.
MIN_CHUNK_TOKENS = 32
FIRST_CHUNK_TOKENS = 64


class PrefillPacer:
    def __init__(self, chunk_tokens: int, time_share: float = 0.2, step_seconds: float = 0.5) -> None:
        self.chunk_tokens = chunk_tokens
        self.time_share = time_share
        self.step_seconds = step_seconds
        self._prefill_time = 0.0  # decaying sums of step time: steps with prompt tokens, all steps
        self._total_time = 0.0
        self._decode_step: float | None = None  # seconds of a decode-only step
        self._token_cost: float | None = None  # seconds a prompt token adds to a step with decode rows
        self._prefill_cost: float | None = None  # seconds a prompt token takes in a prefill-only step

    def budget(self, competing: bool) -> int:
        """Long-prompt tokens the next step may carry; ``competing``: other sequences decode or
        short prompts wait to start."""
        if self.time_share >= 1.0:
            return self.chunk_tokens
        if not competing:  # all the engine's time, in steps short enough for a newcomer to wait
            if self._prefill_cost is None:
                return self.chunk_tokens
            return self._sized(self.step_seconds, self._prefill_cost)
        if self._total_time > 0 and self._prefill_time / self._total_time > self.time_share:
            return 0
        if self._token_cost is None:
            return min(self.chunk_tokens, FIRST_CHUNK_TOKENS)
        return self._sized(self.step_seconds - (self._decode_step or 0.0), self._token_cost)

    def _sized(self, room: float, token_cost: float) -> int:
        return max(MIN_CHUNK_TOKENS, min(self.chunk_tokens, int(room / token_cost)))

    def observe(self, seconds: float, prompt_tokens: int, decode_rows: int, long_tokens: int | None = None) -> None:
        """A step took ``seconds``, carrying ``prompt_tokens`` prompt tokens (``long_tokens`` of
        them from long prompts; default: all) beside ``decode_rows``."""
        long_tokens = prompt_tokens if long_tokens is None else long_tokens
        decay = math.exp(-seconds / WINDOW_SECONDS)
        # What prompt tokens cost the decoding rows: the step's time beyond a decode-only step;
        # the long prompts' part of it counts against their share.
        extra = seconds - (self._decode_step or 0.0) if decode_rows else seconds
        long_part = max(extra, 0.0) * long_tokens / prompt_tokens if prompt_tokens else 0.0
        self._prefill_time = self._prefill_time * decay + long_part
        self._total_time = self._total_time * decay + seconds
        if decode_rows and not prompt_tokens:
            self._decode_step = seconds if self._decode_step is None else 0.7 * self._decode_step + 0.3 * seconds
        elif decode_rows and prompt_tokens:
            self._token_cost = _cautious(self._token_cost, max(extra, 1e-6) / prompt_tokens)
        elif prompt_tokens:  # a prefill-only step: what a token costs with nothing beside it
            self._prefill_cost = _cautious(self._prefill_cost, seconds / prompt_tokens)


def _cautious(estimate: float | None, reading: float) -> float:
    """Dearer tokens (a longer past) count at once; a cheap step moves the estimate slowly: one
    low reading would size the next chunk long."""
    if estimate is None or reading >= estimate:
        return reading
    return 0.8 * estimate + 0.2 * reading
