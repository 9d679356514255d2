"""The KV pool: every layer's cache entries for all rows, in fixed-size blocks.

Per layer one tensor ``[heads, num_blocks, block_size, dim]`` per entry the layer caches
(:mod:`cache_layout`: keys and values for most families; a compressed latent and a rope key for
latent attention; GLM-5 adds an indexer key), all paged by the same blocks. Heads first, so that gathering a row's blocks (``index_select`` on dim 1) gives one contiguous
``[kv_heads, tokens, head_dim]`` run per head without a further copy, and token slot
``block * block_size + offset`` is one index into the flattened ``[kv_heads, slots, head_dim]``.

On a CPU the pool is allocated but not written (``torch.empty``): the operating system backs a
page with memory only when a block on it is first used, so the server's memory grows with the
tokens held, not with the budget. A block is zeroed on its first use (masked slots of a gathered
block must hold finite numbers: a masked NaN still poisons the weighted sum); later uses find
finite keys/values of an earlier row. On a GPU the whole pool is reserved at start-up, as in
vLLM, and zeroed once. A model split over devices (``--device-map``) keeps each layer's
tensors on that layer's device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
import torch

from glm_api.engines.cache_layout import CacheLayout
from glm_api.kv_memory import DEFAULT_CPU_KV_TOKENS, KVShape, kv_tokens_for_memory, step_reserve_bytes
from glm_api.units import byte_size, ceil_div

log = logging.getLogger(__name__)


def per_layer(device: torch.device | Sequence[torch.device], layers: int) -> list[torch.device]:
    """One device for every layer, or the list of each layer's device (a model split by layers)."""
    if isinstance(device, torch.device):
        return [device] * layers
    devices = list(device)
    if len(devices) != layers:
        raise ValueError(f"{len(devices)} layer devices for {layers} layers")
    return devices


def layer_devices(model: torch.nn.Module, layers: int) -> list[torch.device]:
    """Where each attention layer (found by its ``layer_idx``) of ``model`` runs: there go its
    keys and values. All one device unless the model is split over devices."""
    found: dict[int, torch.device] = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        param = next(module.parameters(), None)
        if isinstance(index, int) and param is not None:
            found.setdefault(index, param.device)
    default = next(model.parameters()).device
    return [found.get(i, default) for i in range(layers)]


class KVPool:
    """``layout``: each layer's entries (a ``KVShape``: keys and values of the same shape in
    every layer). ``device``: one for all layers, or one per layer (each layer's entries beside it)."""

    def __init__(
        self,
        layout: CacheLayout | KVShape,
        num_blocks: int,
        block_size: int,
        device: torch.device | Sequence[torch.device],
    ) -> None:
        if isinstance(layout, KVShape):
            layout = CacheLayout.standard(layout)
        self.layout, self.num_blocks, self.block_size = layout, num_blocks, block_size
        self.layer_devices = per_layer(device, layout.num_layers)
        self.device = self.layer_devices[0]  # where a step's index tensors are built
        make = torch.zeros if self.device.type != "cpu" else torch.empty
        self.entries = [
            [make((e.heads, num_blocks, block_size, e.dim), dtype=e.dtype, device=d) for e in layer.entries]
            for layer, d in zip(layout.layers, self.layer_devices)
        ]
        # The first two entries of each layer: what a direct layer's attention reads.
        self.keys = [entries[0] for entries in self.entries]
        self.values = [entries[1] for entries in self.entries]
        self._fresh = self.device.type == "cpu"  # blocks may hold anything until first use
        self.zero([0])  # the padding block

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.layout.bytes_per_token

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[kv_heads, slots, head_dim]`` views, for writing token slots."""
        return self.flat_entry(layer, 0), self.flat_entry(layer, 1)

    def flat_entry(self, layer: int, entry: int) -> torch.Tensor:
        """Entry ``entry`` of ``layer`` as ``[heads, slots, dim]``."""
        t = self.entries[layer][entry]
        return t.view(t.shape[0], -1, t.shape[3])

    def zero(self, blocks: Sequence[int]) -> None:
        if not self._fresh or not blocks:
            return
        ids = list(blocks)
        index: dict[torch.device, torch.Tensor] = {}  # one copy per device, not per layer
        for entries in self.entries:
            for t in entries:
                if t.device not in index:
                    index[t.device] = torch.tensor(ids, dtype=torch.long, device=t.device)
                t.index_fill_(1, index[t.device], 0)

    def copy_block(self, src: int, dst: int) -> None:
        for entries in self.entries:
            for t in entries:
                t[:, dst].copy_(t[:, src])


def blocks_for_budget(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens, plus the padding block."""
    return ceil_div(tokens, block_size) + 1


def gpu_kv_tokens(device: torch.device, utilization: float, reserve_bytes: int, bytes_per_token: int) -> int:
    """KV tokens the memory left on ``device`` holds, at ``bytes_per_token`` (of the layers it holds)."""
    free, total = torch.cuda.mem_get_info(device)
    tokens = kv_tokens_for_memory(total, total - free, utilization, reserve_bytes, bytes_per_token)
    if tokens <= 0:
        raise MemoryError(
            f"no memory left on {device} for the KV cache: {byte_size(total - free)} used of {byte_size(total)} "
            f"at utilization {utilization}; use a smaller dtype or raise --gpu-memory-utilization"
        )
    return tokens


def size_pool(
    layout: CacheLayout | KVShape,
    device: torch.device | Sequence[torch.device],
    *,
    block_size: int,
    kv_cache_tokens: int | None,
    context_length: int,
    gpu_memory_utilization: float,
    step_tokens: int,
    hidden_size: int,
    model_name: str,
) -> int:
    """Blocks for the pool, from the configured budget or (GPU) the memory left after the
    weights; logged with the arithmetic, so an operator sees what fits. ``device``: one, or each
    layer's (a split model: every token needs room on every device, so the device with the least
    room for the layers it holds sets the size)."""
    if isinstance(layout, KVShape):
        layout = CacheLayout.standard(layout)
    held: dict[torch.device, list[int]] = {}
    for i, d in enumerate(per_layer(device, layout.num_layers)):
        held.setdefault(d, []).append(i)
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    elif next(iter(held)).type == "cuda":
        reserve = step_reserve_bytes(step_tokens, hidden_size, layout.dtype)
        tokens = min(
            gpu_kv_tokens(d, gpu_memory_utilization, reserve, layout.bytes_for_layers(layers))
            for d, layers in held.items()
        )
    else:
        tokens = max(DEFAULT_CPU_KV_TOKENS, context_length)
    blocks = blocks_for_budget(tokens, block_size)
    usable = (blocks - 1) * block_size
    log.info(
        "KV cache of %s: %d blocks of %d tokens = %d tokens, %s (%d bytes a token: %s); "
        "%.1f full %d-token contexts fit",
        model_name,
        blocks - 1,
        block_size,
        usable,
        byte_size(usable * layout.bytes_per_token),
        layout.bytes_per_token,
        layout.describe(),
        usable / context_length,
        context_length,
    )
    if len(held) > 1:
        for d, layers in held.items():
            size = byte_size(usable * layout.bytes_for_layers(layers))
            log.info("  KV cache on %s: %d layers, %s", d, len(layers), size)
    return blocks
