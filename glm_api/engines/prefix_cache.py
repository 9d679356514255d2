"""Key/value states of prompt beginnings that recent prompts shared, kept so they are not prefilled again.

Chat prompts repeat their beginnings: the template's default system turn, a deployment's system
prompt, the earlier turns of a conversation sent again with each new message. Prefilling those
tokens again for every request is most of a prefill's work (32 bench prompts of ~55 tokens share
29), so the engine keeps their keys and values, as vLLM's automatic prefix caching does (and
``transformers serve``, for whole 256-token cache pages).

What to keep is learnt from the traffic, in two ways:

- a request's prompt is compared with recent prompts; after its prefill, the beginning it shares
  with one of them (``min_tokens`` or more beyond the prefix it used) is copied out of its cache
  and stored (no extra work but the copy: the next turn of a conversation, a repeated prompt);
- requests admitted together that share a longer beginning than their stored prefix get it
  prefilled once, on its own, first (32 clients with one system prompt, or a few, arriving at
  once).

Finding the longest beginning a prompt shares with any recent prompt needs only its two
neighbours in sorted order (the longest common prefix with a sorted set is reached at a
neighbour), so this costs two comparisons per request, not one per recent prompt.

Rows with different prefixes share one prefill pass (see :mod:`prefill`), so using a stored
prefix costs nothing but a copy. Prefilling a new one costs a pass of its own, and a pass has a
fixed cost: on 2 CPU cores with SmolLM2 a prefill takes ~45 ms plus ~1.4 ms a token, about as
much as 32 tokens. ``plan`` computes one only where it saves more than that.

The entries are bounded by tokens (least recently used go first). They belong to the engine's
worker thread: nothing here is locked.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: Shorter shared beginnings are not worth an entry (nor a pass of their own).
MIN_PREFIX_TOKENS = 16
#: How many recent prompts a new one is compared with.
RECENT_PROMPTS = 256
#: The fixed cost of a forward pass, in prompt tokens (see the module docstring).
PASS_OVERHEAD_TOKENS = 32


@dataclass(eq=False)
class Prefix:
    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, kv_heads, len(tokens), head_dim]

    def __len__(self) -> int:
        return len(self.tokens)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common beginning, by bisection over C-speed slice comparisons."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # invariant: a[:lo] == b[:lo]
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache:
    def __init__(self, max_tokens: int, min_tokens: int = MIN_PREFIX_TOKENS, recent: int = RECENT_PROMPTS) -> None:
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()  # least recently used first
        self._stored_tokens = 0
        self._recent_order: deque[tuple[int, ...]] = deque()
        self._recent_sorted: list[tuple[int, ...]] = []
        self._recent_max = recent

    @property
    def stored_tokens(self) -> int:
        return self._stored_tokens

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: Sequence[int]) -> Prefix | None:
        """The longest stored beginning of ``prompt`` that leaves at least one token to prefill
        (the prefill's last position gives the first token's logits)."""
        best = None
        for tokens, entry in self._entries.items():
            if len(tokens) < len(prompt) and (best is None or len(tokens) > len(best)) and tuple(prompt[: len(tokens)]) == tokens:
                best = entry
        if best is not None:
            self._entries.move_to_end(best.tokens)
        return best

    def shared_length(self, prompt: Sequence[int]) -> int:
        """Tokens at the start of ``prompt`` (all but its last) that a recent prompt also begins with."""
        key = self._key(prompt)
        i = bisect.bisect_left(self._recent_sorted, key)
        neighbours = self._recent_sorted[max(0, i - 1) : i + 1]
        return max((common_prefix_length(key, other) for other in neighbours), default=0)

    def _key(self, prompt: Sequence[int]) -> tuple[int, ...]:
        # No longer beginning could be stored, and a 32k-token prompt is not kept whole.
        return tuple(prompt[: min(len(prompt) - 1, self.max_tokens)])

    def observe(self, prompt: Sequence[int]) -> int:
        """``shared_length`` of a new prompt, which is then remembered for the ones after it."""
        shared = self.shared_length(prompt)
        self.remember(prompt)
        return shared

    def remember(self, prompt: Sequence[int]) -> None:
        key = self._key(prompt)
        if len(key) < self.min_tokens:
            return
        if len(self._recent_order) >= self._recent_max:
            old = self._recent_order.popleft()
            del self._recent_sorted[bisect.bisect_left(self._recent_sorted, old)]
        self._recent_order.append(key)
        bisect.insort(self._recent_sorted, key)

    def plan(
        self, prompts: list[list[int]], compute: Callable[[tuple[int, ...], Prefix | None], Prefix]
    ) -> list[Prefix | None]:
        """The stored prefix each of these prompts (admitted together) is prefilled after.

        Prompts with the same longest stored prefix that share more than it (all of them, or a
        run of them in sorted order) get a longer one, made by ``compute(tokens, base)`` (a pass
        of its own) when the saving pays for the pass.
        """
        chosen = [self.match(prompt) for prompt in prompts]
        same: dict[int, list[int]] = {}
        for i, entry in enumerate(chosen):
            same.setdefault(id(entry), []).append(i)
        for members in same.values():
            base = chosen[members[0]]
            base_length = len(base) if base else 0
            for run in self._runs(prompts, members, base_length):
                first = prompts[run[0]][:-1]
                shared = min(self.max_tokens, *(common_prefix_length(first, prompts[i][:-1]) for i in run[1:]))
                gain = shared - base_length
                if gain >= self.min_tokens and (len(run) - 1) * gain >= PASS_OVERHEAD_TOKENS:
                    entry = compute(tuple(first[:shared]), base)
                    self.store(entry)
                    for i in run:
                        chosen[i] = entry
        return chosen

    def _runs(self, prompts: list[list[int]], members: list[int], base: int) -> list[list[int]]:
        """Groups (two or more) of these prompts that share ``min_tokens`` beyond ``base``: runs of
        neighbours in sorted order (a wave with two system prompts gives two runs)."""
        order = sorted(members, key=lambda i: prompts[i][:-1])
        runs, run = [], order[:1]
        for prev, i in itertools.pairwise(order):
            if common_prefix_length(prompts[prev][:-1], prompts[i][:-1]) >= base + self.min_tokens:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        return [r for r in runs if len(r) > 1]

    def worth_storing(self, shared: int, used: Prefix | None) -> bool:
        """Whether a prompt's beginning of ``shared`` tokens, prefilled after ``used``, is worth keeping."""
        return shared >= (len(used) if used else 0) + self.min_tokens and shared <= self.max_tokens

    def store(self, entry: Prefix) -> None:
        if len(entry) > self.max_tokens or entry.tokens in self._entries:
            return
        self._entries[entry.tokens] = entry
        self._stored_tokens += len(entry)
        while self._stored_tokens > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self._stored_tokens -= len(old)
