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
vLLM, and zeroed once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> "KVShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.num_hidden_layers, kv_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class KVPool:
    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, device: torch.device) -> None:
        self.shape, self.num_blocks, self.block_size, self.device = shape, num_blocks, block_size, device
        make = torch.zeros if device.type != "cpu" else torch.empty
        size = (shape.kv_heads, num_blocks, block_size, shape.head_dim)
        self.keys = [make(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.values = [make(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self._fresh = device.type == "cpu"  # blocks may hold anything until first use
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
        index = torch.tensor(list(blocks), dtype=torch.long, device=self.device)
        for k, v in zip(self.keys, self.values):
            k.index_fill_(1, index, 0)
            v.index_fill_(1, index, 0)

    def copy_block(self, src: int, dst: int) -> None:
        for k, v in zip(self.keys, self.values):
            k[:, dst].copy_(k[:, src])
            v[:, dst].copy_(v[:, src])


def blocks_for_budget(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens, plus the padding block."""
    return -(-tokens // block_size) + 1


def kv_tokens_for_memory(total: int, used: int, utilization: float, reserve: int, bytes_per_token: int) -> int:
    """KV tokens that fit in ``utilization`` of a device's ``total`` bytes after ``used`` (the
    weights, loaded) and ``reserve`` (a step's activations): vLLM's rule, without its profiling
    pass."""
    return max(0, int(total * utilization) - used - reserve) // bytes_per_token


def step_reserve_bytes(step_tokens: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Activations of one step on a GPU: the packed tokens' hidden states and MLP intermediates,
    a generous 32 hidden sizes each, plus 512 MiB for the allocator and the logits."""
    return step_tokens * hidden_size * torch.finfo(dtype).bits // 8 * 32 + 512 * 2**20


def gpu_kv_tokens(shape: KVShape, device: torch.device, utilization: float, reserve_bytes: int) -> int:
    free, total = torch.cuda.mem_get_info(device)
    tokens = kv_tokens_for_memory(total, total - free, utilization, reserve_bytes, shape.bytes_per_token)
    if tokens <= 0:
        raise MemoryError(
            f"no GPU memory left for the KV cache: {(total - free) / 2**30:.1f} GiB used of {total / 2**30:.1f} GiB "
            f"at utilization {utilization}; use a smaller dtype or raise --gpu-memory-utilization"
        )
    return tokens


#: Without ``--kv-cache-tokens`` on a CPU: the pool's pages are backed only as blocks are used,
#: so a generous budget costs address space, not memory.
DEFAULT_CPU_KV_TOKENS = 65536


def size_pool(
    shape: KVShape,
    device: torch.device,
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
    weights; logged with the arithmetic, so an operator sees what fits."""
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    elif device.type == "cuda":
        reserve = step_reserve_bytes(step_tokens, hidden_size, shape.dtype)
        tokens = gpu_kv_tokens(shape, device, gpu_memory_utilization, reserve)
    else:
        tokens = max(DEFAULT_CPU_KV_TOKENS, context_length)
    blocks = blocks_for_budget(tokens, block_size)
    usable = (blocks - 1) * block_size
    log.info(
        "KV cache of %s: %d blocks of %d tokens = %d tokens, %.2f GiB (%d bytes a token); "
        "%.1f full %d-token contexts fit",
        model_name,
        blocks - 1,
        block_size,
        usable,
        usable * shape.bytes_per_token / 2**30,
        shape.bytes_per_token,
        usable / context_length,
        context_length,
    )
    return blocks
