"""The device-map arithmetic of ``--device-map``, on models built on the meta device (no memory).

ChatGLM3-6B's shape in bfloat16: 11.6 GiB of weights, 28 decoder layers of 389 MiB, embeddings
and output layer of 508 MiB each, 1 KiB of keys and values per token and layer. The budgets are
made up for two and four GPUs; nothing here needs one.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from glm_api.cli import settings_from_args
from glm_api.device_map import LayerSplit, Placement, check_split_devices, describe_modules, lookup, plan_device_map
from glm_api.engines.kv_pool import KVPool, KVShape
from glm_api.engines.paged_attention import PagedStep, ScheduledRow
from glm_api.registry import StartupError, layer_split, resolve_model_sources
from tests.conftest import make_settings

GiB = 2**30
BF16 = torch.bfloat16
CPU, META = torch.device("cpu"), torch.device("meta")
LAYERS = 28


@pytest.fixture(scope="module")
def glm6b() -> GlmForCausalLM:
    config = GlmConfig(
        vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=LAYERS,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128, attention_bias=True,
        tie_word_embeddings=False, pad_token_id=0,
    )
    with torch.device("meta"):
        return GlmForCausalLM(config)


def kv_per_layer_token(model) -> int:
    return KVShape.of(model.config, BF16).bytes_per_layer_token


def plan(model, budgets, mode="auto", kv_tokens=65536):
    return plan_device_map(
        model, [int(b) for b in budgets], mode, dtype=BF16, kv_layer_token_bytes=kv_per_layer_token(model), kv_tokens=kv_tokens
    )


def assert_sound(result, model, budgets) -> None:
    """Every layer placed once, embeddings first, head last, each device within its budget."""
    positions = [lookup(f"model.layers.{i}", result.device_map) for i in range(LAYERS)]
    assert positions == sorted(positions)  # in order: one hop per device boundary
    assert sum(result.layers) == LAYERS and [positions.count(p) for p in range(len(budgets))] == result.layers
    assert lookup("model.embed_tokens", result.device_map) == 0
    assert lookup("lm_head", result.device_map) == max(positions)
    layer_kv = result.kv_tokens * kv_per_layer_token(model)
    for pos, budget in enumerate(budgets):
        assert result.kv_bytes[pos] == result.layers[pos] * layer_kv
        assert result.weights[pos] + result.kv_bytes[pos] <= budget, (pos, result)
    params = sum(p.numel() * 2 for p in model.parameters())
    assert 0 <= sum(result.weights) - params < 2**10  # and the rotary embedding's small buffer


def test_two_gpus_hold_the_model_with_room_for_each_share_of_the_kv_cache(glm6b):
    budgets = [10 * GiB, 10 * GiB]
    result = plan(glm6b, budgets)
    assert_sound(result, glm6b, budgets)
    assert result.layers[0] > 0 and result.layers[1] > 0
    # A bigger cache leaves less room for weights on the device filled first.
    bigger = plan(glm6b, budgets, kv_tokens=2 * 65536)
    assert_sound(bigger, glm6b, budgets)
    assert bigger.layers[0] < result.layers[0] and bigger.weights[0] < result.weights[0]


@pytest.mark.parametrize("mode", ["auto", "balanced"])
def test_four_gpus(glm6b, mode):
    budgets = [6 * GiB, 6 * GiB, 6 * GiB, 6 * GiB]
    result = plan(glm6b, budgets, mode)
    assert_sound(result, glm6b, budgets)
    if mode == "auto":  # filled in order: the first devices full, the last nearly idle
        assert result.layers[3] <= 2 and max(result.layers) >= 12, result.layers
    else:  # about even
        assert max(result.layers) - min(result.layers) <= 2, result.layers


def test_uneven_gpus_and_a_cache_sized_to_what_is_left(glm6b):
    budgets = [4 * GiB, 8 * GiB, 6 * GiB]
    result = plan(glm6b, budgets, kv_tokens=None)
    assert_sound(result, glm6b, budgets)
    weights = sum(result.weights)
    # Most of what the weights leave goes to the cache (some stays unused at device edges).
    assert result.kv_tokens * kv_per_layer_token(glm6b) * LAYERS > 0.5 * (sum(budgets) - weights)


def test_budgets_too_small_are_a_clear_error(glm6b):
    with pytest.raises(ValueError, match="does not fit.*Add a device, lower --kv-cache-tokens"):
        plan(glm6b, [5 * GiB, 5 * GiB])
    with pytest.raises(ValueError, match="does not fit"):  # the weights would fit; the cache does not
        plan(glm6b, [6.5 * GiB, 6.5 * GiB], kv_tokens=1_000_000)
    with pytest.raises(ValueError, match="leave no room for a KV cache"):
        plan(glm6b, [6 * GiB, 6 * GiB], kv_tokens=None)
    with pytest.raises(ValueError, match="no memory left"):
        plan(glm6b, [10 * GiB, -1])


def test_placement_puts_each_tensor_on_its_modules_device(glm6b):
    result = plan(glm6b, [10 * GiB, 10 * GiB])
    gpus = (torch.device("cuda", 2), torch.device("cuda", 5))  # any GPUs: only named, never touched
    placement = Placement(gpus, result)
    last = LAYERS - 1
    assert placement.device_of("model.embed_tokens.weight") == gpus[0]
    assert placement.device_of("model.layers.0.self_attn.q_proj.bias") == gpus[0]
    assert placement.device_of(f"model.layers.{last}.mlp.down_proj.weight") == gpus[1]
    assert placement.device_of("lm_head.weight") == gpus[1]
    assert set(placement.device_map.values()) == {2, 5}  # accelerate's names of the GPUs
    assert lookup("anything.at.all", {"": 0}) == 0
    with pytest.raises(ValueError, match="no entry"):
        lookup("model.nowhere", {"model.layers.0": 0})


def test_which_device_lists_split():
    cpu2 = [CPU, CPU]
    assert check_split_devices("none", cpu2) is False
    assert check_split_devices("auto", [CPU]) is False  # one device: loaded whole
    assert check_split_devices("balanced", cpu2) is True  # how the hooks are tested without GPUs
    with pytest.raises(ValueError, match="mix cpu and cuda"):
        check_split_devices("auto", [torch.device("cuda", 0), CPU])
    with pytest.raises(ValueError, match="not one of"):
        check_split_devices("sideways", cpu2)

    assert settings_from_args(["--device-map", "balanced"]).device_map == "balanced"
    assert make_settings().device_map == "none"
    split = layer_split(make_settings(device="cpu,cpu", device_map="auto", kv_cache_tokens=4096), cpu2)
    assert isinstance(split, LayerSplit) and split.devices == (CPU, CPU) and split.kv_cache_tokens == 4096
    assert layer_split(make_settings(device="cpu", device_map="auto"), [CPU]) is None
    with pytest.raises(StartupError, match="--device-map: .*cannot be quantised yet"):  # before any loading
        resolve_model_sources(make_settings(device="cpu,cpu", device_map="auto", quantize="int8"))


def test_each_layers_kv_lives_on_its_layers_device_and_step_indices_cross_once_per_device():
    shape = KVShape(layers=4, kv_heads=2, head_dim=8, dtype=torch.float32)
    devices = [CPU, CPU, META, META]  # the meta device stands in for a second GPU
    pool = KVPool(shape, num_blocks=9, block_size=4, device=devices)
    assert [k.device for k in pool.keys] == devices == [v.device for v in pool.values]
    pool.zero([1, 2])  # one index per device
    step = PagedStep.build(pool, [ScheduledRow([1, 2], past=0, new_ids=[5, 6, 7]), ScheduledRow([3], 2, [9])])
    assert step.on(CPU) is step
    there = step.on(META)
    assert there is step.on(META)  # made by the first layer there, reused by the next
    assert there.slots.device == META and all(g.index.device == META for g in there.groups)


def test_module_lists_read_as_ranges():
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(14)), "model.norm"]
    assert describe_modules(names) == "model.embed_tokens, model.layers.0-13, model.norm"
    assert describe_modules(["model.layers.7", "lm_head"]) == "model.layers.7, lm_head"
    assert describe_modules([""]) == "the whole model"
