"""LoRA adapters per row: the engine's logits under an adapter equal peft's merged model.

Adapters are made by peft on tiny models (a Llama, and a ChatGLM3 under THUDM's module names),
with random non-zero B; each reference is peft's own ``merge_and_unload`` of that adapter. Rows
of three adapters and of the base model share one step of the real runner (paged KV, one packed
forward) and each row must see its own model's logits, at every prompt position and at a decode
step after it.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from glm_api.adapters.lora_files import read_lora
from glm_api.engines.cache_layout import probe_layout
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.engines.kv_blocks import PrefixHit
from glm_api.engines.kv_cache_manager import KVCacheManager
from glm_api.engines.kv_pool import KVPool
from glm_api.engines.lora import LoraLayers
from glm_api.engines.model_runner import ModelRunner
from glm_api.engines.sequence import Sequence
from glm_api.errors import AdapterError, ConflictError, NotFoundError
from glm_api.families.chatglm3 import load_chatglm3
from glm_api.families.quantize import Int8Embedding, Int8Linear, quantize_model
from tests.fixtures.lora_adapters import (
    CHATGLM3_TARGETS,
    LLAMA_TARGETS,
    ChatGLM3Linears,
    chatglm3_checkpoint,
    make_lora,
    merged_chatglm3_folder,
    tiny_chat_with_adapters,
)

CPU = torch.device("cpu")
VOCAB = 97


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


# Three adapters that differ in what peft lets them differ in: rank, targets, alpha, rsLoRA.
LLAMA_ADAPTERS = {
    "all-r4": dict(targets=LLAMA_TARGETS, r=4, alpha=8),
    "qv-r2": dict(targets=["q_proj", "v_proj"], r=2, alpha=16),
    "mlp-r8-rs": dict(targets=["gate_proj", "up_proj", "down_proj"], r=8, alpha=4, use_rslora=True),
}


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory) -> tuple[LlamaForCausalLM, dict[str, tuple[Path, torch.nn.Module]]]:
    base = tiny_llama()
    out = {}
    for seed, (name, spec) in enumerate(LLAMA_ADAPTERS.items()):
        folder = tmp_path_factory.mktemp(f"lora-{name}")
        spec = dict(spec)
        targets = spec.pop("targets")
        merged = make_lora(base, folder, targets, seed=seed, base_model="tiny-llama", **spec)
        out[name] = (folder, merged)
    return base, out


def runner_with(model: torch.nn.Module, adapters: dict[str, Path]) -> tuple[ModelRunner, KVCacheManager]:
    runner = ModelRunner(model, KVPool(probe_layout(model), 64, 4, CPU))
    runner.lora = LoraLayers(model)
    for name, folder in adapters.items():
        runner.lora.add(read_lora(name, folder, model))
    return runner, KVCacheManager(runner.pool)


@torch.inference_mode()
def step_logits(runner: ModelRunner, kv: KVCacheManager, rows: list[tuple[list[int], str | None]]) -> list[torch.Tensor]:
    """Every row's prompt in one packed step (all positions' logits), then one decode step of all
    rows together with a next token each; per row, the logits of prompt + next token."""
    seqs = [Sequence(list(ids), scores_prompt=True, adapter=adapter) for ids, adapter in rows]
    for seq in seqs:
        kv.admit(seq, PrefixHit(), kv.blocks_for(len(seq.token_ids) + 1))
    kv.apply(kv.take_block_ops())
    scheduled = [(seq, len(seq.token_ids)) for seq in seqs]
    out = runner.execute(scheduled)
    kv.computed(scheduled)
    prompt = [out.scored[i].clone() for i in range(len(seqs))]
    for i, seq in enumerate(seqs):
        seq.scores_prompt = False
        seq.token_ids.append((7 * i + 3) % VOCAB)
    scheduled = [(seq, 1) for seq in seqs]
    out = runner.execute(scheduled)
    kv.computed(scheduled)
    for seq in seqs:
        kv.free(seq)
    return [torch.cat([prompt[i], out.logits[i : i + 1]]) for i in range(len(seqs))]


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, ids: list[int], row: int) -> torch.Tensor:
    return model(input_ids=torch.tensor([[*ids, (7 * row + 3) % VOCAB]])).logits[0].float()


PROMPTS = [[5, 17, 42, 9, 3, 60], [11, 2, 88], [70, 71, 72, 73, 74, 75, 76, 77, 78], [1, 30, 40, 50, 6]]


def test_one_adapter_alone_equals_peft_merged_model(llama_adapters) -> None:
    base, adapters = llama_adapters
    folder, merged = adapters["all-r4"]
    runner, kv = runner_with(copy.deepcopy(base), {"all-r4": folder})
    got = step_logits(runner, kv, [(PROMPTS[0], "all-r4")])[0]
    expected = reference_logits(merged, PROMPTS[0], 0)
    assert (expected - reference_logits(base, PROMPTS[0], 0)).abs().max() > 1e-2  # the adapter changes the answer
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["masked", "grouped"])
def test_three_adapters_and_the_base_in_one_step_each_see_their_own_model(llama_adapters, strategy, monkeypatch) -> None:
    base, adapters = llama_adapters
    if strategy == "grouped":  # the path stacks wider than MASKED_WIDTH take
        monkeypatch.setattr("glm_api.engines.lora.MASKED_WIDTH", 0)
    runner, kv = runner_with(copy.deepcopy(base), {name: folder for name, (folder, _) in adapters.items()})
    names = [*adapters, None]
    rows = [(PROMPTS[i], names[i]) for i in range(4)]
    # Twice: rows in this order, then interleaved so an adapter's tokens are not one run.
    for order in ([0, 1, 2, 3], [2, 3, 0, 2, 1, 3, 0]):
        got = step_logits(runner, kv, [rows[i] for i in order])
        for position, (logits, i) in enumerate(zip(got, order)):
            reference = adapters[names[i]][1] if names[i] else base
            expected = reference_logits(reference, PROMPTS[i], position)
            torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4, msg=lambda m, n=names[i]: f"{n}: {m}")
    assert runner.decode is not None and runner.decode.steps == 2  # the decode steps took the lean path


@pytest.mark.parametrize("strategy", ["masked", "grouped"])
def test_chatglm3_adapter_on_fused_qkv_equals_peft_merged_model(tiny_chatglm3_dir: Path, tmp_path: Path, strategy, monkeypatch) -> None:
    if strategy == "grouped":
        monkeypatch.setattr("glm_api.engines.lora.MASKED_WIDTH", 0)
    config, weights = chatglm3_checkpoint(tiny_chatglm3_dir)
    linears = ChatGLM3Linears(weights, config["num_layers"])
    merged_folders = {}
    for seed, (name, targets, r) in enumerate(
        [("glm-all", CHATGLM3_TARGETS, 4), ("glm-qkv", ["query_key_value"], 2), ("glm-mlp", ["dense_h_to_4h", "dense_4h_to_h"], 8)]
    ):
        merged = make_lora(linears, tmp_path / name, targets, r=r, alpha=8, seed=seed, base_model="THUDM/chatglm3-6b")
        merged_folders[name] = merged_chatglm3_folder(tiny_chatglm3_dir, merged, tmp_path / f"{name}-merged")
    saved = json.loads((tmp_path / "glm-all" / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == set(CHATGLM3_TARGETS)
    model = load_chatglm3(tiny_chatglm3_dir, CPU, torch.float32).model
    runner, kv = runner_with(model, {name: tmp_path / name for name in merged_folders})
    names = [*merged_folders, None]
    got = step_logits(runner, kv, [(PROMPTS[i], names[i]) for i in range(4)])
    base = load_chatglm3(tiny_chatglm3_dir, CPU, torch.float32).model
    for i, name in enumerate(names):
        reference = load_chatglm3(merged_folders[name], CPU, torch.float32).model if name else base
        expected = reference_logits(reference, PROMPTS[i], i)
        if name:
            assert (expected - reference_logits(base, PROMPTS[i], i)).abs().max() > 1e-2
        torch.testing.assert_close(got[i], expected, atol=5e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _dequantised(quantised: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A dense copy of an int8 model: the same codes times their scales, plus ``deltas`` (by
    module name) on the linear weights, in float32."""
    dense = copy.deepcopy(quantised)
    for name, module in list(dense.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if isinstance(module, Int8Linear):
            twin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                twin.weight.copy_(module.qweight.float() * module.scale[:, None] + deltas.get(name, 0))
                if module.bias is not None:
                    twin.bias.copy_(module.bias)
        elif isinstance(module, Int8Embedding):
            twin = torch.nn.Embedding(module.num_embeddings, module.embedding_dim)
            with torch.no_grad():
                twin.weight.copy_(module.qweight.float() * module.scale.float())
        else:
            continue
        setattr(dense.get_submodule(parent) if parent else dense, leaf, twin)
    return dense.eval()


def test_quantised_base_with_adapter_equals_dequantised_reference(llama_adapters) -> None:
    """--quantize int8 under an adapter: the reference is the same int8 codes dequantised plus
    peft's merged delta (the merged model's weights minus the base's), dense in float32. int8's
    kernel rounds activations to bf16, hence the tolerance (the base row is held to the same)."""
    base, adapters = llama_adapters
    folder, merged = adapters["all-r4"]
    quantised = copy.deepcopy(base)
    quantize_model(quantised, "int8")
    merged_state, base_state = merged.state_dict(), base.state_dict()
    deltas = {
        name: merged_state[name + ".weight"] - base_state[name + ".weight"]
        for name, module in quantised.named_modules() if isinstance(module, Int8Linear)
    }
    assert max(d.abs().max() for d in deltas.values()) > 1e-2
    runner, kv = runner_with(quantised, {"all-r4": folder})
    got = step_logits(runner, kv, [(PROMPTS[0], "all-r4"), (PROMPTS[1], None)])
    with_adapter = reference_logits(_dequantised(quantised, deltas), PROMPTS[0], 0)
    assert (with_adapter - reference_logits(_dequantised(quantised, {}), PROMPTS[0], 0)).abs().max() > 0.1
    torch.testing.assert_close(got[0], with_adapter, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got[1], reference_logits(_dequantised(quantised, {}), PROMPTS[1], 1), atol=3e-2, rtol=3e-2)


def test_a_step_without_adapter_rows_is_the_base_model(llama_adapters) -> None:
    base, adapters = llama_adapters
    runner, kv = runner_with(copy.deepcopy(base), {name: folder for name, (folder, _) in adapters.items()})
    got = step_logits(runner, kv, [(PROMPTS[0], None), (PROMPTS[1], None)])
    for i in range(2):
        torch.testing.assert_close(got[i], reference_logits(base, PROMPTS[i], i), atol=2e-5, rtol=1e-4)


# -- bad adapters: clear errors ----------------------------------------------------------------


def _edit_config(folder: Path, tmp_path: Path, **changes) -> Path:
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_rank_that_disagrees_with_the_config_is_refused(llama_adapters, tmp_path: Path) -> None:
    base, adapters = llama_adapters
    folder = _edit_config(adapters["all-r4"][0], tmp_path, r=16)
    with pytest.raises(AdapterError, match=r"rank 16"):
        read_lora("x", folder, base)


def test_target_modules_the_model_lacks_are_refused(llama_adapters, tmp_path: Path, tiny_chatglm3_dir: Path) -> None:
    base, _ = llama_adapters
    config, weights = chatglm3_checkpoint(tiny_chatglm3_dir)
    make_lora(ChatGLM3Linears(weights, config["num_layers"]), tmp_path / "glm", CHATGLM3_TARGETS, base_model="THUDM/chatglm3-6b")
    with pytest.raises(AdapterError, match=r"does not have: .*layers.0.mlp.dense_h_to_4h.*trained on 'THUDM/chatglm3-6b'"):
        read_lora("glm", tmp_path / "glm", base)


def test_adapter_for_another_size_is_refused(tmp_path: Path) -> None:
    other = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )).eval()
    make_lora(other, tmp_path / "wide", ["q_proj"], base_model="wide-llama")
    with pytest.raises(AdapterError, match=r"does not fit the chat model \(it was trained on 'wide-llama'\).*48 -> 48"):
        read_lora("wide", tmp_path / "wide", tiny_llama())


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "adapter_model.safetensors").unlink(), r"has no weight file \(adapter_model.safetensors or adapter_model.bin\)"),
        (lambda f: (f / "adapter_config.json").unlink(), r"has no adapter_config.json"),
        (lambda f: (f / "adapter_config.json").write_text("{not json"), r"not a LoRA adapter config"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage"), r"cannot read the adapter weights"),
    ],
)
def test_broken_folders_are_refused(llama_adapters, tmp_path: Path, breakage, message: str) -> None:
    import shutil

    base, adapters = llama_adapters
    folder = tmp_path / "broken"
    shutil.copytree(adapters["qv-r2"][0], folder)
    breakage(folder)
    with pytest.raises(AdapterError, match=message):
        read_lora("broken", folder, base)
    with pytest.raises(AdapterError, match="is not a folder"):
        read_lora("none", tmp_path / "nowhere", base)


def test_dora_is_refused(llama_adapters, tmp_path: Path) -> None:
    base, adapters = llama_adapters
    with pytest.raises(AdapterError, match="use_dora"):
        read_lora("d", _edit_config(adapters["qv-r2"][0], tmp_path, use_dora=True), base)


# -- the engine: requests by adapter, the prefix cache, unloading ---------------------------------


@pytest.fixture(scope="module")
def tiny_chat(tiny_llama_dir: Path, tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, loaded as the server loads it, and two adapters."""
    return tiny_chat_with_adapters(tiny_llama_dir, tmp_path_factory)


def _greedy(model, ids: list[int], steps: int, stop: frozenset[int]) -> list[int]:
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token in stop:
                break
    return out


async def _run(engine, ids: list[int], request_id: str, adapter: str | None, max_tokens: int = 6):
    from glm_api.engines.base import SamplingParams

    tokens, cached = [], None
    async for chunk in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, adapter=adapter), request_id):
        tokens += chunk.token_ids
        cached = chunk.cached_tokens
    return tokens, cached


def test_engine_requests_by_adapter_generate_what_the_merged_models_generate(tiny_chat) -> None:
    loaded, adapters = tiny_chat
    engine = TransformersChatEngine(loaded, "tiny", kv_cache_tokens=2048, kv_block_size=4, prefix_cache_tokens=512)
    for name, (folder, _) in adapters.items():
        engine.load_adapter(name, str(folder))
    assert engine.adapters == ["sql", "poet"]
    ids = loaded.template.encode_messages([{"role": "user", "content": "Write a query for the capital of France."}])
    stop = loaded.template.stop_token_ids
    engine.start()
    try:
        async def main():
            # Concurrent: the four requests share steps.
            return await asyncio.gather(*[
                _run(engine, ids, f"r{i}", adapter) for i, adapter in enumerate(["sql", None, "poet", "sql"])
            ])

        results = asyncio.run(main())
        expected = {
            "sql": _greedy(adapters["sql"][1], ids, 6, stop),
            "poet": _greedy(adapters["poet"][1], ids, 6, stop),
            None: _greedy(loaded.model, ids, 6, stop),
        }
        assert expected["sql"] != expected[None] or expected["poet"] != expected[None]
        for (tokens, _), adapter in zip(results, ["sql", None, "poet", "sql"]):
            assert tokens == expected[adapter], adapter
    finally:
        engine.stop()


def test_prefix_cache_blocks_are_never_shared_between_adapters(tiny_chat) -> None:
    loaded, adapters = tiny_chat
    engine = TransformersChatEngine(loaded, "tiny", kv_cache_tokens=2048, kv_block_size=4, prefix_cache_tokens=512)
    engine.load_adapter("sql", str(adapters["sql"][0]))
    engine.load_adapter("poet", str(adapters["poet"][0]))
    ids = loaded.template.encode_messages([{"role": "user", "content": "The same long prompt for every request here."}])
    stop = loaded.template.stop_token_ids
    engine.start()
    try:
        async def one(adapter, rid):
            return await _run(engine, ids, rid, adapter, max_tokens=3)

        first = asyncio.run(one("sql", "a"))
        assert first[1] == 0
        base = asyncio.run(one(None, "b"))
        assert base[1] == 0  # the sql blocks hold the same tokens, computed under other weights
        assert base[0] == _greedy(loaded.model, ids, 3, stop)
        poet = asyncio.run(one("poet", "c"))
        assert poet[1] == 0
        assert poet[0] == _greedy(adapters["poet"][1], ids, 3, stop)
        again = asyncio.run(one("sql", "d"))
        assert again[1] >= len(ids) - 4  # its own blocks are found again
        assert again[0] == first[0]
        # Unloaded and loaded again under the same name: the old blocks are not its.
        engine.unload_adapter("sql")
        engine.load_adapter("sql", str(adapters["poet"][0]))
        reloaded = asyncio.run(one("sql", "e"))
        assert reloaded[1] == 0 and reloaded[0] == poet[0]
    finally:
        engine.stop()


def test_unloading_refuses_while_requests_of_the_adapter_are_in_flight(tiny_chat) -> None:
    loaded, adapters = tiny_chat
    engine = TransformersChatEngine(loaded, "tiny", kv_cache_tokens=2048, kv_block_size=4)
    engine.load_adapter("sql", str(adapters["sql"][0]))
    ids = loaded.template.encode("hello there")

    async def main():
        from glm_api.engines.base import SamplingParams

        stream = engine.generate(ids, SamplingParams(max_tokens=200, temperature=0, adapter="sql"), "busy-1")
        await stream.__anext__()  # running: 199 more tokens to go
        with pytest.raises(ConflictError, match=r"1 request\(s\) in flight \(busy-1\)"):
            engine.unload_adapter("sql")
        await stream.aclose()  # the client leaves: the request is aborted
        for _ in range(200):
            if engine.num_running == 0 and engine.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        engine.unload_adapter("sql")  # nothing in flight now
        with pytest.raises(NotFoundError, match="'sql' is not loaded"):
            engine.generate(ids, SamplingParams(max_tokens=2, adapter="sql"), "late")
        with pytest.raises(NotFoundError):
            engine.unload_adapter("sql")

    engine.start()
    try:
        asyncio.run(main())
    finally:
        engine.stop()


class _Req:
    def __init__(self, ids: list[int], root: bytes | None = None) -> None:
        self.seq = Sequence(list(ids), cache_salt=root)
        self.priority = 0


@pytest.mark.parametrize(
    ("cached_blocks", "roots", "first_step"),
    [
        (16, (None, None), 1),  # same model, prefix cache on: the second waits a step for the shared beginning
        (16, (None, b"adapter-root-1234"), 2),  # another adapter's blocks would never be shared: no wait
        (0, (None, None), 2),  # prefix cache off: nothing to wait for
    ],
)
def test_a_prompt_waits_for_a_shared_beginning_only_when_it_could_reuse_it(cached_blocks, roots, first_step) -> None:
    from collections import deque

    from glm_api.engines.scheduler import MIN_SHARED_TOKENS, Scheduler

    model = tiny_llama()
    kv = KVCacheManager(KVPool(probe_layout(model), 64, 4, CPU), cached_blocks=cached_blocks)
    shared = list(range(1, MIN_SHARED_TOKENS + 5))
    waiting = deque([_Req(shared + [60, 61], roots[0]), _Req(shared + [70, 71], roots[1])])
    plan = Scheduler(kv, max_running=8, chunk_tokens=256).schedule([], waiting)
    assert len(plan.admitted) == first_step
