"""A model split by layers (``--device-map``), wired with accelerate's hooks, on CPUs only.

Every entry of the map is the CPU here, so the hooks are forced on (``cpu,cpu``): the split model
runs through the same hooks, per-layer KV devices and step copies as on GPUs, and must give what
the unsplit model gives, logits and greedy tokens, through the real engine.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from glm_api.device_map import SKIP_KEYS, LayerSplit
from glm_api.engines.base import SamplingParams
from glm_api.engines.kv_pool import KVPool, KVShape
from glm_api.engines.paged_attention import PagedStep, ScheduledRow, install
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.families.chatglm3 import load_chatglm3
from glm_api.families.detect import load_chat_model
from glm_api.registry import ModelSource, ModelSources, build_registry
from tests.conftest import make_settings
from tests.engines.test_chat_batching import collect
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
QUESTIONS = ["你好", "What is the weather like in Beijing?", "def add(a, b):"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_chatglm3(tmp_path_factory.mktemp("chatglm3_split"), num_layers=4)


@pytest.fixture(scope="module")
def whole(folder):
    return load_chatglm3(folder, CPU, torch.float32)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def two_cpus(model) -> LayerSplit:
    """Each CPU budgeted the whole model's size: balanced, that puts half the layers on each."""
    total = weight_bytes(model)
    return LayerSplit((CPU, CPU), "balanced", kv_cache_tokens=64, budgets=(total, total))


def test_the_chatglm3_loader_streams_each_tensor_to_its_mapped_device(folder, whole):
    split = two_cpus(whole.model)
    placement = split.place(whole.model, torch.float32)
    assert placement.plan.layers == [2, 2]
    loaded = load_chatglm3(folder, CPU, torch.float32, split=split)
    model = loaded.model
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta and tensor.device == placement.device_of(name), name
    # Hooks on every mapped module, passing the engine's step objects through untouched.
    for name in placement.plan.device_map:
        hook = model.get_submodule(name)._hf_hook
        assert set(SKIP_KEYS) <= set(hook.skip_keys)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, whole.model(input_ids=ids).logits, rtol=0, atol=0)


def test_one_cache_object_reaches_every_layer(folder, whole):
    model = load_chatglm3(folder, CPU, torch.float32, split=two_cpus(whole.model)).model
    install(model)
    pool = KVPool(KVShape.of(model.config, torch.float32), 16, 4, [CPU] * 4)
    step = PagedStep.build(pool, [ScheduledRow([1, 2], 0, [5, 6, 7, 8, 9]), ScheduledRow([3, 4], 0, [11, 12])])
    inputs = step.model_inputs()
    seen: list[tuple[int, object, object]] = []

    def record(module, args, kwargs):
        seen.append((module.layer_idx, kwargs["cache"], kwargs["paged_step"]))

    handles = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.inference_mode():
            model(**inputs, logits_to_keep=torch.tensor(step.last_index))
    finally:
        for handle in handles:
            handle.remove()
    assert [layer for layer, _, _ in seen] == [0, 1, 2, 3]
    assert all(cache is inputs["cache"] and paged is step for _, cache, paged in seen)


def test_the_engine_answers_the_same_split_and_whole(folder, whole, caplog):
    """Through the registry, as the server starts: ``--device cpu,cpu --device-map balanced``."""
    settings = make_settings(device="cpu,cpu", device_map="balanced", max_running=4, kv_cache_tokens=512)
    caplog.set_level("INFO", logger="glm_api")
    registry = build_registry(settings, ModelSources(ModelSource("tiny", folder), ()))
    split = registry.chat
    assert isinstance(split, TransformersChatEngine)  # one engine, no router
    assert hasattr(split.model, "_hf_hook")  # dispatched over the two CPUs
    assert "split over 2 devices (--device-map balanced" in caplog.text and "model.layers.0-1" in caplog.text
    reference = TransformersChatEngine(load_chatglm3(folder, CPU, torch.float32), "tiny", max_running=4, kv_cache_tokens=512)
    prompts = [split.template.encode_messages([{"role": "user", "content": q}]) for q in QUESTIONS]

    async def answers(engine):
        return await asyncio.gather(*[collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(prompts)])

    registry.start()
    reference.start()
    try:
        got, expected = asyncio.run(answers(split)), asyncio.run(answers(reference))
    finally:
        registry.stop()
        reference.stop()
    assert [out.ids for out in got] == [out.ids for out in expected]
    assert all(len(out.ids) > 0 for out in got)


def test_a_transformers_folder_splits_too(tiny_glm4_dir):
    whole = load_chat_model(tiny_glm4_dir, CPU, torch.float32, cache_dir=None)
    split = two_cpus(whole.model)
    placement = split.place(whole.model, torch.float32)
    loaded = load_chat_model(tiny_glm4_dir, CPU, torch.float32, cache_dir=None, split=split)
    assert placement.plan.layers == [1, 1] and loaded.model.hf_device_map == placement.device_map
    assert all(hasattr(loaded.model.get_submodule(name), "_hf_hook") for name in placement.device_map)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, whole.model(input_ids=ids).logits, rtol=0, atol=0)
