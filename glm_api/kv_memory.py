"""KV-cache memory arithmetic, shared by the chat engine's pool sizing and the layer placement
(:mod:`glm_api.device_map`): the bytes a token's keys and values take, what fits in a device.

The engine sizes its pool from what the loaded model's layers really hand to the cache
(:mod:`glm_api.engines.cache_layout`); :func:`layer_cache_bytes` estimates the same from a
config alone, for plans made before the weights load (``--device-map``, ``bench/kv_budget.py``).
The tests check that both agree for every layout the engine knows."""

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


def layer_cache_bytes(config, dtype: torch.dtype) -> list[int]:
    """Bytes one token takes in each layer's cache, from the config: keys and values of
    ``kv_heads x head_dim``; or, for multi-head latent attention (``kv_lora_rank``: DeepSeek-V3,
    ``glm4_moe_lite``, ``glm_moe_dsa``), one latent of ``kv_lora_rank`` and one rope key of
    ``qk_rope_head_dim``, plus an indexer key of ``index_head_dim`` on the layers that run a
    sparse-attention indexer (``indexer_types`` "full"; GLM-5)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = torch.finfo(dtype).bits // 8
    layers = text.num_hidden_layers
    if getattr(text, "kv_lora_rank", None) is None:
        return [KVShape.of(config, dtype).bytes_per_layer_token] * layers
    latent = (text.kv_lora_rank + text.qk_rope_head_dim) * size
    if getattr(text, "index_head_dim", None) is None:
        return [latent] * layers
    kinds = getattr(text, "indexer_types", None) or ["full"] * layers
    return [latent + (text.index_head_dim * size if kind == "full" else 0) for kind in kinds]


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
