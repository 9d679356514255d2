"""One chat model split by layers over several devices (``--device-map auto|balanced``).

With a device map the devices of ``--device`` hold one copy of the model between them instead
of one copy each: accelerate's tools choose where each module goes (``infer_auto_device_map``
fills the devices in order; ``get_balanced_memory`` first caps each near an even share) and
``dispatch_model`` hooks each layer so that its inputs move to its device. Those tools count
weights only, so the budget they get per device leaves room for that device's share of the KV
cache (:func:`plan_device_map`); the family loader streams each tensor to its module's device
(:meth:`Placement.device_of`) and the engine keeps each layer's keys and values beside it.
:func:`layer_split` reads the settings into a :class:`LayerSplit` (cheap: the model sources
check it before the server starts, the registry then loads the chat model with it).

A split saves memory, not time: a step runs the layers in order, so one device works while the
others wait. Every entry of the list must be a GPU, or (to test the wiring) every one ``cpu``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from glm_api.kv_memory import DEFAULT_CPU_KV_TOKENS, layer_cache_bytes, step_reserve_bytes
from glm_api.units import byte_size

if TYPE_CHECKING:
    from glm_api.config import Settings

log = logging.getLogger(__name__)

SplitMode = Literal["auto", "balanced"]
DEVICE_MAP_MODES = ("none", "auto", "balanced")
#: Forward keywords the device hooks pass through untouched: the engine's cache and step objects
#: (one per step, shared by every layer; each layer finds its own device's tensors in them), and
#: the logit rows to keep, an index that stays on the CPU to select rows on whatever device the
#: last layer leaves them.
SKIP_KEYS = ("cache", "paged_step", "logits_to_keep")


def check_split_devices(mode: str, devices: Sequence[torch.device]) -> bool:
    """Whether ``--device-map mode`` splits the model over ``devices``; ValueError for a list it
    cannot split. One device is no split (the model loads whole, as without a map)."""
    if mode not in DEVICE_MAP_MODES:
        raise ValueError(f"device map {mode!r} is not one of {', '.join(DEVICE_MAP_MODES)}")
    if mode == "none" or len(devices) < 2:
        return False
    kinds = {d.type for d in devices}
    if kinds != {"cuda"} and kinds != {"cpu"}:
        raise ValueError(
            f"--device-map {mode} splits one model over GPUs, but the devices "
            f"{', '.join(map(str, devices))} mix {' and '.join(sorted(kinds))}; list GPUs only"
        )
    return True


@dataclass(frozen=True)
class SplitPlan:
    """Where each module goes, by position in the device list, and what each position holds."""

    device_map: dict[str, int]  # module name -> position
    weights: list[int]  # bytes of weights per position
    layers: list[int]  # decoder layers per position
    kv_tokens: int  # the KV cache size the budgets left room for
    kv_bytes: list[int]  # that cache's share per position


def lookup(name: str, device_map: dict[str, Any]) -> Any:
    """The map's value for a parameter or module: that of the longest entry containing it."""
    key = name
    while key not in device_map:
        if not key:
            raise ValueError(f"{name!r} is in no entry of the device map")
        key = key.rpartition(".")[0]
    return device_map[key]


def plan_device_map(
    model: torch.nn.Module,
    budgets: Sequence[int],
    mode: SplitMode,
    *,
    dtype: torch.dtype,
    kv_layer_token_bytes: int,
    kv_tokens: int | None,
) -> SplitPlan:
    """Place ``model`` (on the meta device, or loaded) over devices with ``budgets`` bytes each for
    weights and KV cache. ``kv_tokens`` None: the largest cache the budgets leave room for.

    accelerate also keeps the largest module's size free on the first device (room to bring back
    an offloaded module, which a split never does): headroom there for the step's activations."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory
    from accelerate.utils.modeling import get_max_layer_size

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])  # transformers: the decoder layer class
    layer_names = [name for name, m in model.named_modules() if type(m).__name__ in no_split]
    if not layer_names:
        raise ValueError(f"{type(model).__name__} declares no decoder layer class (_no_split_modules): it cannot be split")
    sizes = compute_module_sizes(model, dtype=dtype)
    layer = min(sizes[name] for name in layer_names)
    largest, _ = get_max_layer_size(list(model.named_children()), sizes, no_split)
    weights = sizes[""]
    if min(budgets) <= 0:
        raise ValueError(f"no memory left on a device for the model: budgets {_sizes(budgets)}")
    if kv_tokens is None:
        # As many tokens as the scaled budgets below still leave room for the weights, each
        # device allowed to leave one whole module unplaced (and the first to keep one free).
        room = sum(budgets) / (weights + len(budgets) * largest) - 1
        kv_tokens = int(layer * room / kv_layer_token_bytes)
        if kv_tokens < 1:
            raise ValueError(
                f"the weights ({byte_size(weights)}) leave no room for a KV cache in the devices' budgets "
                f"{_sizes(budgets)}; add a device, use a smaller --dtype or raise --gpu-memory-utilization"
            )
    kv_layer = kv_tokens * kv_layer_token_bytes
    # accelerate counts weights only. A device holding n layers needs n * (layer + kv_layer) plus
    # its other modules; a budget scaled by layer / (layer + kv_layer) keeps that within the
    # real budget (the embeddings and head, which have no cache, are charged as if they had one).
    scale = layer / (layer + kv_layer)
    max_memory: dict[int | str, int] = {i: int(b * scale) for i, b in enumerate(budgets)}
    if mode == "balanced":
        max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split, dtype=dtype)
    placed = infer_auto_device_map(model, max_memory, no_split_module_classes=no_split, dtype=dtype)
    left = [name for name, where in placed.items() if not isinstance(where, int)]
    if left:
        raise ValueError(
            f"the model does not fit: {byte_size(weights)} of weights and a KV cache of {kv_tokens} tokens "
            f"({byte_size(kv_layer * len(layer_names))}) over budgets {_sizes(budgets)}: {left[0] or 'the model'} and what "
            "follows found no room. Add a device, lower --kv-cache-tokens, or use a smaller --dtype"
        )
    device_map = {name: int(where) for name, where in placed.items()}
    held = [0] * len(budgets)
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:  # tied weights once
        held[lookup(name, device_map)] += sizes[name]
    layers = [0] * len(budgets)
    for name in layer_names:
        layers[lookup(name, device_map)] += 1
    kv = [n * kv_layer for n in layers]
    return SplitPlan(device_map, held, layers, kv_tokens, kv)


def _accelerate_device(device: torch.device) -> int | str:
    """accelerate's name of a device: a GPU by its index, the CPU as "cpu"."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return str(device)


@dataclass(frozen=True)
class Placement:
    """A plan over real devices: where each tensor loads, and the hooks that run it."""

    devices: tuple[torch.device, ...]  # one per position of the plan
    plan: SplitPlan

    @property
    def device_map(self) -> dict[str, int | str]:
        """In accelerate's (and ``from_pretrained``'s) form."""
        return {name: _accelerate_device(self.devices[pos]) for name, pos in self.plan.device_map.items()}

    def device_of(self, name: str) -> torch.device:
        """Where a parameter or buffer of the model goes."""
        return self.devices[lookup(name, self.plan.device_map)]

    def dispatch(self, model: torch.nn.Module) -> None:
        """Hook every mapped module so that its inputs move to its device, moving any weight not
        there yet. Hooks are forced even when all devices are one (the CPU test wiring)."""
        from accelerate import dispatch_model
        from accelerate.hooks import remove_hook_from_submodules

        remove_hook_from_submodules(model)  # from_pretrained's hooks do not know our SKIP_KEYS
        device_map = self.device_map
        with _quiet_cpu_warnings(self.devices):
            dispatch_model(
                model, device_map, main_device=device_map[next(iter(device_map))], skip_keys=list(SKIP_KEYS), force_hooks=True
            )


@dataclass(frozen=True)
class LayerSplit:
    """``--device-map`` over the devices of ``--device``, with what sizes the KV share.

    ``budgets``: bytes per device for weights and KV cache; by default measured (a GPU:
    ``gpu_memory_utilization`` of its memory less what is used and one step's activations;
    CPUs: the available memory shared evenly)."""

    devices: tuple[torch.device, ...]
    mode: SplitMode
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    step_tokens: int = 512 + 32  # tokens of one step (a prefill chunk and the decoding rows): its activations
    budgets: tuple[int, ...] | None = None

    def place(self, model: torch.nn.Module, dtype: torch.dtype) -> Placement:
        """The plan for ``model`` loaded in ``dtype``, logged; ValueError when it does not fit."""
        config = model.config
        layer_bytes = max(layer_cache_bytes(config, dtype))  # the plan charges every layer alike: the largest
        kv_tokens = self.kv_cache_tokens
        if kv_tokens is None and self.devices[0].type != "cuda":
            kv_tokens = DEFAULT_CPU_KV_TOKENS  # CPU pool pages are backed only as they fill
        hidden = config.get_text_config().hidden_size
        budgets = list(self.budgets) if self.budgets is not None else self._measured_budgets(hidden, dtype)
        with _quiet_cpu_warnings(self.devices):
            plan = plan_device_map(
                model, budgets, self.mode, dtype=dtype, kv_layer_token_bytes=layer_bytes, kv_tokens=kv_tokens
            )
        placement = Placement(self.devices, plan)
        log.info(
            "chat model split over %d devices (--device-map %s, KV room for %d tokens):",
            len(self.devices), self.mode, plan.kv_tokens,
        )
        for pos, device in enumerate(self.devices):
            names = [name for name, where in plan.device_map.items() if where == pos]
            log.info(
                "  [%d] %s: %s; %d layers, %s weights + %s KV, budget %s",
                pos, device, describe_modules(names) or "nothing", plan.layers[pos], byte_size(plan.weights[pos]),
                byte_size(plan.kv_bytes[pos]), byte_size(budgets[pos]),
            )
            if not names:
                hint = " (--device-map balanced spreads it)" if self.mode == "auto" else ""
                log.warning("[%d] %s holds no part of the chat model: it fits on fewer devices%s", pos, device, hint)
        log.debug("device map of the chat model: %s", placement.device_map)
        return placement

    def place_folder(self, path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> Placement:
        """The plan for a transformers causal LM folder, from its model built on the meta device
        (structure and sizes, no memory)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return self.place(model, dtype)

    def _measured_budgets(self, hidden_size: int, dtype: torch.dtype) -> list[int]:
        if self.devices[0].type == "cuda":
            reserve = step_reserve_bytes(self.step_tokens, hidden_size, dtype)
            budgets = []
            for device in self.devices:
                free, total = torch.cuda.mem_get_info(device)
                budgets.append(int(total * self.gpu_memory_utilization) - (total - free) - reserve)
            return budgets
        import psutil

        return [psutil.virtual_memory().available // len(self.devices)] * len(self.devices)


def layer_split(settings: Settings, devices: list[torch.device]) -> LayerSplit | None:
    """``--device-map`` over the ``--device`` list, or None when nothing is split (no map, or
    one device); ValueError for a list that cannot be split."""
    if not check_split_devices(settings.device_map, devices):
        return None
    if settings.quantize != "none":
        raise ValueError("a model split over devices cannot be quantised yet (--quantize); use one of the two")
    return LayerSplit(
        tuple(devices), settings.device_map, kv_cache_tokens=settings.kv_cache_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        step_tokens=settings.prefill_chunk_tokens + settings.max_running,
    )


#: What accelerate warns about a CPU-only split, untrue there: the integer keys it takes for
#: devices name GPUs it cannot find, and weights kept on the CPU count as "offloaded".
_CPU_SPLIT_NOISE = ("is not available, available devices are", "are on the meta device because they were offloaded")


@contextmanager
def _quiet_cpu_warnings(devices: Sequence[torch.device]) -> Iterator[None]:
    def keep(record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _CPU_SPLIT_NOISE)

    loggers = [logging.getLogger(n) for n in ("accelerate.utils.modeling", "accelerate.big_modeling")]
    quiet = all(d.type == "cpu" for d in devices)
    for logger in loggers if quiet else []:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers if quiet else []:
            logger.removeFilter(keep)


_NUMBERED = re.compile(r"(.*?)\.?(\d+)$")


def describe_modules(names: Sequence[str]) -> str:
    """``model.layers.0 .. model.layers.13`` as ``model.layers.0-13``, other names as they are."""
    parts: dict[str, list[int] | None] = {}  # a name, or a numbered run's prefix -> its numbers
    for name in names:
        match = _NUMBERED.fullmatch(name)
        if match is None:
            parts[name or "the whole model"] = None
        else:
            parts.setdefault(match.group(1), []).append(int(match.group(2)))
    return ", ".join(
        name if nums is None else f"{name}.{min(nums)}" + (f"-{max(nums)}" if len(nums) > 1 else "")
        for name, nums in parts.items()
    )


def _sizes(sizes: Sequence[float]) -> str:
    return "[" + ", ".join(byte_size(s) for s in sizes) + "]"
