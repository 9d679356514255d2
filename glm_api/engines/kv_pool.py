"""The KV pool: every layer's keys and values for all rows, in fixed-size blocks.

Per layer one key and one value tensor ``[kv_heads, num_blocks, block_size, head_dim]``:
heads first, so that gathering a row's blocks (``index_select`` on dim 1) gives one contiguous
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
from collections import Counter
from collections.abc import Sequence
import torch

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
    """``device``: one for all layers, or one per layer (each layer's keys and values beside it)."""

    def __init__(
        self, shape: KVShape, num_blocks: int, block_size: int, device: torch.device | Sequence[torch.device]
    ) -> None:
        self.shape, self.num_blocks, self.block_size = shape, num_blocks, block_size
        self.layer_devices = per_layer(device, shape.layers)
        self.device = self.layer_devices[0]  # where a step's index tensors are built
        make = torch.zeros if self.device.type != "cpu" else torch.empty
        size = (shape.kv_heads, num_blocks, block_size, shape.head_dim)
        self.keys = [make(size, dtype=shape.dtype, device=d) for d in self.layer_devices]
        self.values = [make(size, dtype=shape.dtype, device=d) for d in self.layer_devices]
        self._fresh = self.device.type == "cpu"  # blocks may hold anything until first use
        self.zero([0])  # the padding block

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_size * self.shape.bytes_per_token

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[kv_heads, slots, head_dim]`` views, for writing token slots."""
        k, v = self.keys[layer], self.values[layer]
        return k.view(k.shape[0], -1, k.shape[3]), v.view(v.shape[0], -1, v.shape[3])

    def zero(self, blocks: Sequence[int]) -> None:
        if not self._fresh or not blocks:
            return
        ids = list(blocks)
        index: dict[torch.device, torch.Tensor] = {}  # one copy per device, not per layer
        for k, v in zip(self.keys, self.values):
            if k.device not in index:
                index[k.device] = torch.tensor(ids, dtype=torch.long, device=k.device)
            k.index_fill_(1, index[k.device], 0)
            v.index_fill_(1, index[k.device], 0)

    def copy_block(self, src: int, dst: int) -> None:
        for k, v in zip(self.keys, self.values):
            k[:, dst].copy_(k[:, src])
            v[:, dst].copy_(v[:, src])


def blocks_for_budget(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens, plus the padding block."""
    return ceil_div(tokens, block_size) + 1


def gpu_kv_tokens(
    shape: KVShape, device: torch.device, utilization: float, reserve_bytes: int, layers: int | None = None
) -> int:
    """KV tokens the memory left on ``device`` holds for ``layers`` of the model's layers (all)."""
    free, total = torch.cuda.mem_get_info(device)
    per_token = shape.bytes_per_layer_token * (shape.layers if layers is None else layers)
    tokens = kv_tokens_for_memory(total, total - free, utilization, reserve_bytes, per_token)
    if tokens <= 0:
        raise MemoryError(
            f"no memory left on {device} for the KV cache: {byte_size(total - free)} used of {byte_size(total)} "
            f"at utilization {utilization}; use a smaller dtype or raise --gpu-memory-utilization"
        )
    return tokens


def size_pool(
    shape: KVShape,
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
    room per layer it holds sets the size)."""
    held = Counter(per_layer(device, shape.layers))
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    elif next(iter(held)).type == "cuda":
        reserve = step_reserve_bytes(step_tokens, hidden_size, shape.dtype)
        tokens = min(gpu_kv_tokens(shape, d, gpu_memory_utilization, reserve, layers) for d, layers in held.items())
    else:
        tokens = max(DEFAULT_CPU_KV_TOKENS, context_length)
    blocks = blocks_for_budget(tokens, block_size)
    usable = (blocks - 1) * block_size
    log.info(
        "KV cache of %s: %d blocks of %d tokens = %d tokens, %s (%d bytes a token); "
        "%.1f full %d-token contexts fit",
        model_name,
        blocks - 1,
        block_size,
        usable,
        byte_size(usable * shape.bytes_per_token),
        shape.bytes_per_token,
        usable / context_length,
        context_length,
    )
    if len(held) > 1:
        for d, layers in held.items():
            size = byte_size(usable * shape.bytes_per_layer_token * layers)
            log.info("  KV cache on %s: %d layers, %s", d, layers, size)
    return blocks
