"""KV-cache memory arithmetic, shared by the chat engine's pool sizing and the layer placement
(:mod:`glm_api.device_map`): the bytes a token's keys and values take, what fits in a device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    def bytes_per_layer_token(self) -> int:
        """Keys and values of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token in every layer."""
        return self.layers * self.bytes_per_layer_token


def kv_tokens_for_memory(total: int, used: int, utilization: float, reserve: int, bytes_per_token: int) -> int:
    """KV tokens that fit in ``utilization`` of a device's ``total`` bytes after ``used`` (the
    weights, loaded) and ``reserve`` (a step's activations): vLLM's rule, without its profiling
    pass."""
    return max(0, int(total * utilization) - used - reserve) // bytes_per_token


def step_reserve_bytes(step_tokens: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Activations of one step on a GPU: the packed tokens' hidden states and MLP intermediates,
    a generous 32 hidden sizes each, plus 512 MiB for the allocator and the logits."""
    return step_tokens * hidden_size * torch.finfo(dtype).bits // 8 * 32 + 512 * 2**20


#: Without ``--kv-cache-tokens`` on a CPU: the pool's pages are backed only as blocks are used,
#: so a generous budget costs address space, not memory.
DEFAULT_CPU_KV_TOKENS = 65536
