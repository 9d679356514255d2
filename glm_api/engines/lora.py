"""LoRA deltas applied per row inside the model runner's forward (issue 29).

Rows of different adapters, and rows of none, share one step. Each module some loaded adapter
targets gets a forward hook that adds, to the base module's output, the delta of each token's
own adapter: ``y += scale[i] * B[i] (A[i] x)``. The base weights are never touched (no merge):
the same model serves every adapter and the base, and a quantised base (``--quantize``) keeps its
quantised kernels, the delta being computed beside it in the model's dtype.

Per module, the ``n`` loaded adapters sit side by side: ``a_cat`` ``[in, n*r]`` (each A
transposed, input-major as glm_api/families/weight_layout.py stores base weights on CPU) and
``b_cat`` ``[n*r, out]`` (each B transposed, times its scale), every rank padded with zeros to
the largest ``r`` of all, and zeros for an adapter that does not target the module. Per step the
runner says which adapter each row uses (:meth:`LoraLayers.step`); from that, once per step:

- *masked* (while ``n*r`` is at most :data:`MASKED_WIDTH`): a ``[tokens, n*r]`` 0/1 mask that
  keeps each token's own adapter's columns; each module then does ``h = (x @ a_cat) * mask;
  y += h @ b_cat``: three kernel calls whatever the mix, at ``n*r`` columns of extra work;
- *grouped* (wider stacks): each adapter's tokens (a slice when they are one run, else an index)
  through its own ``r`` columns: per adapter present a gather, two small matmuls and a
  scatter-add.

Measured on the 2-core CPU for SmolLM2's projections, 32 decode rows over 4 adapters of rank 8,
all seven projections of 30 layers (``python bench/bench_lora.py --kernels``): base 46.5 ms,
masked +6.6 ms, grouped +21 ms, and a per-token gather of the stacked matrices followed by
batched matmuls (punica's BGMV) +33 ms, since it moves ``tokens x r x (in + out)`` values per
module. A step with no adapter row costs one attribute test per hooked module.

All state is on the :class:`LoraLayers` object the runner holds; its lock is held for a whole
forward, so loading or unloading an adapter (which restacks) never changes tensors under a step.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from glm_api.adapters.lora_files import LoraWeights

#: Widest stack (adapters x padded rank) applied masked; wider ones go grouped.
MASKED_WIDTH = 128


@dataclass
class _Stack:
    """One module's adapters, side by side (slot ``s`` owns columns ``s*r .. s*r + r``)."""

    a_cat: torch.Tensor  # [in, n*r]
    b_cat: torch.Tensor  # [n*r, out], each adapter's scale folded in
    present: list[bool]  # per slot: whether its adapter targets this module


@dataclass
class _Routing:
    """Which tokens of the step use which adapter, in the form the step's strategy needs (its
    tensors made per device and dtype on first use)."""

    tokens: int
    rank: int
    slots: int
    token_slots: list[int]  # per packed token: its adapter's slot, -1 for the base model
    masked: bool
    groups: list[tuple[int, slice | list[int]]] = field(default_factory=list)  # grouped: (slot, its tokens)
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = ("mask", device, dtype)
        if key not in self._cache:
            own = torch.tensor(self.token_slots, device=device)[:, None]
            columns = torch.arange(self.slots, device=device).repeat_interleave(self.rank)[None, :]
            self._cache[key] = (own == columns).to(dtype)
        return self._cache[key]

    def select(self, group: int, device: torch.device) -> slice | torch.Tensor:
        rows = self.groups[group][1]
        if isinstance(rows, slice):
            return rows
        key = ("rows", group, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._cache[key]


class LoraLayers:
    """The loaded adapters of one model (one engine replica) and the hooks that apply them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.adapters: dict[str, LoraWeights] = {}  # in slot order
        self.cache_roots: dict[str, bytes] = {}
        self._loads = 0  # a new load of a name gets a new cache root: old blocks never match
        self._rank = 0  # the largest rank of any loaded adapter: every stack's padded rank
        self._stacks: dict[str, _Stack] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._routing: _Routing | None = None  # set for the length of one forward

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    # -- loading and unloading (any thread; waits for the step in progress) --------------------

    def add(self, weights: LoraWeights) -> None:
        with self.lock:
            self.adapters[weights.name] = weights
            self._loads += 1
            self.cache_roots[weights.name] = _root_digest(weights.name, self._loads)
            self._restack()

    def remove(self, name: str) -> None:
        with self.lock:
            del self.adapters[name]
            del self.cache_roots[name]
            self._restack()

    def _restack(self) -> None:
        """Lay every adapter's deltas side by side per module (slots in ``adapters`` order) and
        hook exactly the modules some adapter targets."""
        modules = dict(self.model.named_modules())
        targets = sorted({t for w in self.adapters.values() for t in w.deltas})
        rank = max((w.max_rank for w in self.adapters.values()), default=0)
        n = len(self.adapters)
        stacks = {}
        for target in targets:
            deltas = [w.deltas.get(target) for w in self.adapters.values()]
            some = next(d for d in deltas if d is not None)
            a_cat = some.a.new_zeros(some.a.shape[1], n * rank)
            b_cat = some.b.new_zeros(n * rank, some.b.shape[0])
            for slot, d in enumerate(deltas):
                if d is not None:
                    a_cat[:, slot * rank : slot * rank + d.rank] = d.a.T
                    b_cat[slot * rank : slot * rank + d.rank] = d.b.T * d.scale
            stacks[target] = _Stack(a_cat, b_cat, [d is not None for d in deltas])
        for target in set(self._hooks) - set(stacks):
            self._hooks.pop(target).remove()
        for target in set(stacks) - set(self._hooks):
            self._hooks[target] = modules[target].register_forward_hook(self._hook(target))
        self._stacks, self._rank = stacks, rank

    # -- one step (the runner's thread) ----------------------------------------------------------

    @contextmanager
    def step(self, rows: Sequence[tuple[str | None, int, int]]) -> Iterator[None]:
        """For one forward over packed rows, each given as (adapter, first token, tokens): each
        row's tokens get its adapter's deltas (adapter None: the base model's output alone)."""
        with self.lock:
            self._routing = self._route(rows)
            try:
                yield
            finally:
                self._routing = None

    def _route(self, rows: Sequence[tuple[str | None, int, int]]) -> _Routing | None:
        if all(name is None for name, _, _ in rows):
            return None  # a step of base rows only: the hooks return at once
        slots = {name: i for i, name in enumerate(self.adapters)}
        token_slots = [-1] * sum(n for _, _, n in rows)
        for name, start, n in rows:
            if name is not None:
                token_slots[start : start + n] = [slots[name]] * n
        masked = len(slots) * self._rank <= MASKED_WIDTH
        routing = _Routing(len(token_slots), self._rank, len(slots), token_slots, masked)
        if not masked:
            by_slot: dict[int, list[int]] = {}
            for t, slot in enumerate(token_slots):
                if slot >= 0:
                    by_slot.setdefault(slot, []).append(t)
            for slot, positions in sorted(by_slot.items()):
                run = positions[-1] - positions[0] + 1 == len(positions)
                routing.groups.append((slot, slice(positions[0], positions[-1] + 1) if run else positions))
        return routing

    def _hook(self, target: str):
        def add_deltas(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            routing = self._routing
            if routing is None:
                return output
            stack = self._stacks[target]
            x = args[0].reshape(-1, args[0].shape[-1])
            y = output.view(-1, output.shape[-1])  # a view: the deltas land in the output
            if routing.masked:
                h = (x @ stack.a_cat).mul_(routing.mask(x.device, x.dtype))
                y.addmm_(h, stack.b_cat)
                return output
            r = routing.rank
            for g, (slot, _) in enumerate(routing.groups):
                if not stack.present[slot]:
                    continue
                rows = routing.select(g, x.device)
                cols = slice(slot * r, slot * r + r)
                delta = (x[rows] @ stack.a_cat[:, cols]) @ stack.b_cat[cols]
                if isinstance(rows, slice):
                    y[rows] += delta
                else:
                    y.index_add_(0, rows, delta)
            return output

        return add_deltas


def _root_digest(name: str, load: int) -> bytes:
    """The prefix cache's parent of an adapter's first block: blocks computed under one adapter
    (one load of it) are never found by prompts of another, nor of the base (whose root is None)."""
    return hashlib.blake2b(f"lora\0{name}\0{load}".encode(), digest_size=16).digest()
