"""LoRA deltas applied per row inside the model runner's forward (issue 29).

Rows of different adapters, and rows of none, share one step. Each module some loaded adapter
targets gets a forward hook that adds, to the base module's output, the delta of each token's
own adapter: ``y += scale[i] * B[i] (A[i] x)``. The base weights are never touched (no merge):
the same model serves every adapter and the base, and a quantised base (``--quantize``) keeps its
quantised kernels, the delta being computed beside it in the model's dtype.

The adapters of a module are stacked (A ``[n, r, in]``, B ``[n, out, r]``, stored transposed; rank padded with
zeros to the largest; a slot whose adapter does not target the module holds zeros). Per step the
runner says which adapter each of its rows uses (:meth:`LoraLayers.step`); the tokens of the
adapter rows are grouped by adapter once for the step (:class:`_Routing`), so each hooked module
does, per adapter present, one gather-free slice or one index gather, two small matmuls and one
scatter-add. A per-token gather of the stacked matrices (``A[idx]``, then batched ``bmm``: the
punica/S-LoRA "BGMV" kernel) was measured slower on CPU (bench/bench_lora.py ``--kernels``):
it moves ``tokens x r x (in + out)`` values per module where grouping moves ``r x (in + out)``
per adapter. A step with no adapter row costs one attribute test per hooked module.

All state is on the :class:`LoraLayers` object the runner holds; its lock is held for a whole
forward, so loading or unloading an adapter (which restacks) never changes the tensors under a
step.
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


@dataclass
class _Stack:
    """One module's adapters, stacked by slot."""

    # Input-major, as glm_api/families/weight_layout.py stores the base weights on CPU: the
    # products are then x @ a[slot] @ b[slot], which MKL reads without a transpose.
    a: torch.Tensor  # [n, in, r]: each adapter's A transposed
    b: torch.Tensor  # [n, r, out]: each adapter's B transposed
    scale: list[float]  # per slot; 0 where the slot's adapter does not target this module
    present: list[bool]  # per slot: whether its adapter targets this module


@dataclass
class _Routing:
    """Which tokens of the step use which adapter: ``groups`` of (slot, token selection), the
    selection a ``slice`` when the adapter's tokens are one contiguous run, else an index tensor
    (per device, made on first use)."""

    groups: list[tuple[int, slice | list[int]]] = field(default_factory=list)
    _indices: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict)

    def select(self, group: int, device: torch.device) -> slice | torch.Tensor:
        rows = self.groups[group][1]
        if isinstance(rows, slice):
            return rows
        key = (group, device)
        if key not in self._indices:
            self._indices[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._indices[key]


class LoraLayers:
    """The loaded adapters of one model (one engine replica) and the hooks that apply them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.adapters: dict[str, LoraWeights] = {}  # in slot order
        self.cache_roots: dict[str, bytes] = {}
        self._loads = 0  # a new load of a name gets a new cache root: old blocks never match
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
        """Stack every adapter's deltas per module (slots in ``adapters`` order) and hook exactly
        the modules some adapter targets."""
        modules = dict(self.model.named_modules())
        targets = sorted({t for w in self.adapters.values() for t in w.deltas})
        stacks = {}
        for target in targets:
            deltas = [w.deltas.get(target) for w in self.adapters.values()]
            some = next(d for d in deltas if d is not None)
            rank = max(d.rank for d in deltas if d is not None)
            n, out_f, in_f = len(deltas), some.b.shape[0], some.a.shape[1]
            a = some.a.new_zeros(n, in_f, rank)
            b = some.b.new_zeros(n, rank, out_f)
            for slot, d in enumerate(deltas):
                if d is not None:
                    a[slot, :, : d.rank] = d.a.T
                    b[slot, : d.rank] = d.b.T
            stacks[target] = _Stack(a, b, [d.scale if d else 0.0 for d in deltas], [d is not None for d in deltas])
        for target in set(self._hooks) - set(stacks):
            self._hooks.pop(target).remove()
        for target in set(stacks) - set(self._hooks):
            self._hooks[target] = modules[target].register_forward_hook(self._hook(target))
        self._stacks = stacks

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
        slots = {name: i for i, name in enumerate(self.adapters)}
        tokens: dict[int, list[int]] = {}
        for name, start, n in rows:
            if name is not None:
                tokens.setdefault(slots[name], []).extend(range(start, start + n))
        if not tokens:
            return None  # a step of base rows only: the hooks return at once
        routing = _Routing()
        for slot, positions in sorted(tokens.items()):
            positions.sort()
            contiguous = positions[-1] - positions[0] + 1 == len(positions)
            routing.groups.append((slot, slice(positions[0], positions[-1] + 1) if contiguous else positions))
        return routing

    def _hook(self, target: str):
        def add_deltas(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            routing = self._routing
            if routing is None:
                return output
            stack = self._stacks[target]
            x = args[0].reshape(-1, args[0].shape[-1])
            y = output.reshape(-1, output.shape[-1])
            for g, (slot, _) in enumerate(routing.groups):
                if not stack.present[slot]:
                    continue
                rows = routing.select(g, x.device)
                delta = (x[rows] @ stack.a[slot]) @ stack.b[slot]
                if isinstance(rows, slice):
                    y[rows].add_(delta, alpha=stack.scale[slot])
                else:
                    y.index_add_(0, rows, delta, alpha=stack.scale[slot])
            return output

        return add_deltas


def _root_digest(name: str, load: int) -> bytes:
    """The prefix cache's parent of an adapter's first block: blocks computed under one adapter
    (one load of it) are never found by prompts of another, nor of the base (whose root is None)."""
    return hashlib.blake2b(f"lora\0{name}\0{load}".encode(), digest_size=16).digest()
