"""What each attention layer of a model keeps in its KV cache, learned from the model itself.

Families differ in what a layer hands to the cache: GLM, Llama, GLM-4 pass keys and values of
``kv_heads x head_dim`` each; multi-head latent attention (``glm4_moe_lite``, DeepSeek-V3 style)
passes a compressed latent (``kv_lora_rank``) and one rope key (``qk_rope_head_dim``), and
expands them into per-head keys and values only after reading the cache; GLM-5's sparse
attention (``glm_moe_dsa``) also caches an indexer key per token (``cache.update_indexer``).
Rather than read this from config fields that each family names its own way, :func:`probe_layout`
runs the model once on two tokens through a recording cache and records, for every layer, the
tensors it hands to the cache (count, heads, width, dtype) and whether its attention function
then receives exactly those tensors (a *direct* layer: attention reads keys and values from the
pool itself) or something derived from them (the latent layers: the pool hands the layer its
whole cached history back, and the layer expands it as it does with transformers' own caches).

A model whose cache the engine cannot hold (a layer that never writes to the cache, writes twice,
writes tensors of another shape, or uses a cache method the pool does not have) is refused here,
at start-up, with :class:`UnsupportedCacheError` naming its architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from glm_api.kv_memory import KVShape

PROBE_ATTENTION = "glm_api_cache_probe"
PROBE_TOKENS = 2


class UnsupportedCacheError(ValueError):
    """The engine cannot page this model's cache (raised at start-up, never in a request)."""


@dataclass(frozen=True)
class CacheEntry:
    """One tensor a layer caches per token: ``heads x dim`` elements of ``dtype``."""

    heads: int
    dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.heads * self.dim * torch.finfo(self.dtype).bits // 8


@dataclass(frozen=True)
class LayerCache:
    """A layer's cache entries: what ``update`` takes (key-like, value-like), then the indexer
    key when the layer has one. ``direct``: attention gets the ``update`` tensors unchanged."""

    entries: tuple[CacheEntry, ...]
    direct: bool = True
    indexer: bool = False

    @property
    def bytes_per_token(self) -> int:
        return sum(e.bytes_per_token for e in self.entries)


@dataclass(frozen=True)
class CacheLayout:
    """Every layer's :class:`LayerCache`, in layer order, for the model ``architecture``."""

    layers: tuple[LayerCache, ...]
    architecture: str = "model"

    @classmethod
    def standard(cls, shape: KVShape, architecture: str = "model") -> CacheLayout:
        """Keys and values of ``kv_heads x head_dim`` in every layer (what ``KVShape`` describes)."""
        entry = CacheEntry(shape.kv_heads, shape.head_dim, shape.dtype)
        return cls((LayerCache((entry, entry)),) * shape.layers, architecture)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].entries[0].dtype

    @property
    def bytes_per_token(self) -> int:
        """Everything one token takes in every layer."""
        return sum(layer.bytes_per_token for layer in self.layers)

    def bytes_for_layers(self, layers: list[int]) -> int:
        """One token's bytes in the given layers (those a device holds)."""
        return sum(self.layers[i].bytes_per_token for i in layers)

    @property
    def indexed(self) -> bool:
        """Whether some layer selects keys with an indexer (its mask is built once per step)."""
        return any(layer.indexer for layer in self.layers)

    def describe(self) -> str:
        """The distinct layer layouts, for the start-up log: ``47 x [1x512 + 1x64] bf16``."""
        counts: dict[tuple, int] = {}
        for layer in self.layers:
            key = tuple((e.heads, e.dim, e.dtype) for e in layer.entries)
            counts[key] = counts.get(key, 0) + 1
        parts = []
        for key, n in counts.items():
            entries = " + ".join(f"{h}x{d}" for h, d, _ in key)
            parts.append(f"{n} x [{entries}] {str(key[0][2]).removeprefix('torch.')}")
        return ", ".join(parts)


class _RecordingCache:
    """The probe's ``cache``: records what each layer hands over and returns it unchanged."""

    is_compileable = False

    def __init__(self) -> None:
        self.updates: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.indexer: dict[int, list[torch.Tensor]] = {}
        self.attention: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.updates.setdefault(layer_idx, []).append((key_states, value_states))
        return key_states, value_states

    def update_indexer(self, key_states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        self.indexer.setdefault(layer_idx, []).append(key_states)
        return key_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache_probe: _RecordingCache | None = None,
    indices: torch.Tensor | None = None,
    **kwargs: Any,
):
    """Records what attention receives, then runs SDPA (the output only has to have its shape)."""
    if cache_probe is not None:
        cache_probe.attention.setdefault(getattr(module, "layer_idx", -1), []).append((key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _entry(tensor: torch.Tensor, heads_axis: bool) -> CacheEntry | None:
    """``[1, heads, tokens, dim]`` (or ``[1, tokens, dim]`` for an indexer key) as an entry."""
    if heads_axis and tensor.dim() == 4 and tensor.shape[0] == 1 and tensor.shape[2] == PROBE_TOKENS:
        return CacheEntry(tensor.shape[1], tensor.shape[3], tensor.dtype)
    if not heads_axis and tensor.dim() == 3 and tensor.shape[0] == 1 and tensor.shape[1] == PROBE_TOKENS:
        return CacheEntry(1, tensor.shape[2], tensor.dtype)
    return None


def _num_layers(model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.num_hidden_layers


def architecture_of(model: torch.nn.Module) -> str:
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    return f"{names[0]} ({getattr(model.config, 'model_type', '?')})"


@torch.inference_mode()
def probe_layout(model: torch.nn.Module) -> CacheLayout:
    """The model's :class:`CacheLayout`, from one forward over two tokens (any device; the
    model's attention implementation is restored afterwards)."""
    arch = architecture_of(model)
    recorder = _RecordingCache()
    AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    ids = torch.zeros((1, PROBE_TOKENS), dtype=torch.long, device=device)
    causal = torch.ones((PROBE_TOKENS, PROBE_TOKENS), dtype=torch.bool, device=device).tril()[None, None]
    model.set_attn_implementation(PROBE_ATTENTION)
    try:
        model(
            input_ids=ids,
            position_ids=torch.arange(PROBE_TOKENS, device=device)[None],
            attention_mask=causal,  # 4D: transformers uses it as it is, builds none
            cache=recorder,
            use_cache=True,
            cache_probe=recorder,
            logits_to_keep=1,
        )
    except AttributeError as exc:
        if exc.obj is not recorder:
            raise _probe_failed(arch, exc) from exc
        raise UnsupportedCacheError(
            f"{arch}: this server cannot hold its KV cache in its paged pool: its layers keep state through "
            f"cache.{exc.name}, which the pool does not page (only keys/values, latents and indexer keys)"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any failure means: this cache cannot be paged
        raise _probe_failed(arch, exc) from exc
    finally:
        model.set_attn_implementation(previous)
    return _layout_from(recorder, _num_layers(model), arch)


def _probe_failed(arch: str, exc: Exception) -> UnsupportedCacheError:
    return UnsupportedCacheError(
        f"{arch}: this server cannot hold its KV cache in its paged pool (a forward through a recording "
        f"cache failed: {type(exc).__name__}: {exc})"
    )


def _layout_from(recorder: _RecordingCache, num_layers: int, arch: str) -> CacheLayout:
    def refuse(why: str) -> UnsupportedCacheError:
        return UnsupportedCacheError(f"{arch}: this server cannot hold its KV cache in its paged pool: {why}")

    indexed = bool(recorder.indexer)
    layers = []
    for i in range(num_layers):
        calls = recorder.updates.get(i, [])
        if not calls:
            raise refuse(f"layer {i} keeps nothing in the cache through cache.update (a recurrent or other unpaged state)")
        if len(calls) > 1:
            raise refuse(f"layer {i} writes to the cache {len(calls)} times in a forward (the pool needs exactly once)")
        key, value = calls[0]
        entries = [_entry(key, True), _entry(value, True)]
        index_keys = recorder.indexer.get(i, [])
        if len(index_keys) > 1:
            raise refuse(f"layer {i} writes its indexer key {len(index_keys)} times in a forward")
        entries += [_entry(k, False) for k in index_keys]
        if any(e is None for e in entries):
            shapes = [tuple(t.shape) for t in (key, value, *index_keys)]
            raise refuse(f"layer {i} caches tensors of shapes {shapes}, not [batch, heads, tokens, dim]")
        seen = recorder.attention.get(i, [])
        if len(seen) != 1:
            raise refuse(f"layer {i} runs its attention function {len(seen)} times in a forward")
        # Direct: attention reads the pool itself, which holds exactly what it would receive.
        direct = not indexed and seen[0][0] is key and seen[0][1] is value and key.shape[3] == value.shape[3]
        layers.append(LayerCache(tuple(entries), direct=direct, indexer=bool(index_keys)))  # type: ignore[arg-type]
    extra = sorted(set(recorder.updates) - set(range(num_layers)))
    if extra:
        raise refuse(f"cache writes for layers {extra} beyond its {num_layers} layers")
    return CacheLayout(tuple(layers), arch)
