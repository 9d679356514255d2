"""What each layer caches, learned by a probe forward: keys and values, a latent plus a rope key,
an indexer key; the pool sized by those real bytes; caches the pool cannot hold refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM, RecurrentGemmaConfig, RecurrentGemmaForCausalLM

from glm_api.engines.cache_layout import CacheEntry, UnsupportedCacheError, probe_layout
from glm_api.engines.kv_pool import KVPool
from glm_api.engines.paged_attention import ATTENTION_NAME, install
from glm_api.kv_memory import layer_cache_bytes
from tests.engines.test_paged_kv import KINDS, LATENT, _tiny

F32 = torch.float32


def _entries(layout) -> list[list[tuple[int, int]]]:
    return [[(e.heads, e.dim) for e in layer.entries] for layer in layout.layers]


def test_each_family_caches_what_its_layers_hand_over():
    latent = [(1, LATENT["kv_lora_rank"]), (1, LATENT["qk_rope_head_dim"])]
    expected = {
        "llama": [[(2, 8), (2, 8)]] * 2,  # 2 KV heads of 32 / 4 heads
        "glm": [[(2, 8), (2, 8)]] * 2,
        "glm4_moe_lite": [latent] * 2,
        "glm_moe_dsa": [latent + [(1, 16)], latent, latent + [(1, 16)]],  # "FSF": the middle layer reuses
    }
    for kind in KINDS:
        layout = probe_layout(_tiny(kind))
        assert _entries(layout) == expected[kind], kind
        assert all(e.dtype == F32 for layer in layout.layers for e in layer.entries)
        direct = kind in ("llama", "glm")  # the latent layers expand what they read: not direct
        assert [layer.direct for layer in layout.layers] == [direct] * layout.num_layers, kind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_the_config_estimate_agrees_with_the_probe(kind, dtype):
    """--device-map and bench/kv_budget.py size from the config before loading: the same bytes."""
    model = _tiny(kind).to(dtype)
    layout = probe_layout(model)
    assert layer_cache_bytes(model.config, dtype) == [layer.bytes_per_token for layer in layout.layers]


def test_the_pool_holds_every_entry_of_every_layer_at_its_real_size():
    layout = probe_layout(_tiny("glm_moe_dsa"))
    pool = KVPool(layout, num_blocks=9, block_size=4, device=torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for entries in pool.entries for t in entries)
    assert held == pool.nbytes == 9 * 4 * layout.bytes_per_token
    assert layout.bytes_per_token == 4 * (2 * (16 + 8) + (16 + 8)) + 4 * 2 * 16  # float32
    assert layout.indexed and "2 x [1x16 + 1x8 + 1x16] float32" in layout.describe()


def test_the_probe_leaves_the_models_attention_as_it_found_it():
    model = _tiny("glm4_moe_lite")
    install(model)
    probe_layout(model)
    assert model.config._attn_implementation == ATTENTION_NAME


def _recurrent():
    config = RecurrentGemmaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, lru_width=32, attention_window_size=16,
    )
    return RecurrentGemmaForCausalLM(config).eval()


def _hybrid_linear_attention():
    config = Qwen3NextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen3NextForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("build", "arch"),
    [(_recurrent, "RecurrentGemmaForCausalLM (recurrent_gemma)"), (_hybrid_linear_attention, "Qwen3NextForCausalLM (qwen3_next)")],
)
def test_a_cache_the_pool_cannot_hold_is_refused_by_architecture(build, arch):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedCacheError, match="cannot hold its KV cache") as refused:
        probe_layout(build())
    assert str(refused.value).startswith(arch)


def test_an_entry_counts_its_bytes():
    assert CacheEntry(1, 576, torch.bfloat16).bytes_per_token == 1152  # DeepSeek-V3's latent + rope key


def test_the_tiny_glm5_attends_sparsely():
    """The parity tests' GLM-5 keeps 6 keys per query: past 6 tokens that changes its logits
    (so the paged engine's equality with the stock forward covers the indexer's choice)."""
    model = _tiny("glm_moe_dsa")
    ids = torch.arange(40)[None] % 97
    with torch.inference_mode():
        sparse = model(input_ids=ids).logits[0]
        for module in model.modules():
            if hasattr(module, "index_topk"):
                module.index_topk = 64
        dense = model(input_ids=ids).logits[0]
    torch.testing.assert_close(sparse[:6], dense[:6])
    assert (sparse[10:] - dense[10:]).abs().amax() > 1e-3
