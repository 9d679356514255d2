"""--quantize int8 | w8a8 | int4: the real loaders and engine on tiny checkpoints and SmolLM2.

Bounds, last-position logits against the same model unquantised (cosine): int8 and w8a8 at
least 0.99 (the issue's), int4 at least 0.95 on the tiny random-weight checkpoints; next-token
choices on SmolLM2's real weights: see test_a_real_model_keeps_its_next_token_choices.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from glm_api.engines.base import SamplingParams
from glm_api.engines.base import Constraint
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.families import quantize as q
from glm_api.families.tensor_stream import iter_checkpoint
from glm_api.families.detect import load_chat_model
from glm_api.families.mapped_pages import MappedFile
from glm_api.families.quant_kernels import choose_kernels
from glm_api.registry import ModelSource, ModelSources, build_registry
from tests.conftest import make_settings
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3

CPU = torch.device("cpu")
MODES = ("int8", "w8a8", "int4")
COSINE_BOUND = {"int8": 0.99, "w8a8": 0.99, "int4": 0.95}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
QUESTIONS = ["你好，请介绍一下你自己。", "What is the weather like in Beijing?", "def add(a, b):", "上海明天的天气"]


@pytest.fixture(scope="module")
def chatglm3_dir(tmp_path_factory) -> Path:
    # 128 wide: int4's groups of 128 and every projection a multiple of 16 rows.
    return build_tiny_chatglm3(
        tmp_path_factory.mktemp("chatglm3-q"), hidden_size=128, num_attention_heads=4, kv_channels=32,
        ffn_hidden_size=256, seq_length=1024,
    )


def _load(folder: Path, mode: str, tmp_path: Path):
    return load_chat_model(folder, CPU, torch.float32, tmp_path / "cache", quantize=mode)


def _last_logits(loaded, questions=QUESTIONS) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for question in questions:
            ids = torch.tensor([loaded.template.encode_messages([{"role": "user", "content": question}])])
            rows.append(loaded.model(input_ids=ids).logits[0, -1].float())
    return torch.stack(rows)


def _decoder_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["chatglm3", "llama"])
def test_logits_stay_close_to_the_unquantised_model(family, mode, chatglm3_dir, tiny_llama_dir, tmp_path):
    folder = chatglm3_dir if family == "chatglm3" else tiny_llama_dir
    reference = _last_logits(_load(folder, "none", tmp_path))
    quantised = _load(folder, mode, tmp_path)
    assert _decoder_linears(quantised.model) == []  # every projection of every layer is quantised
    head, table = quantised.model.lm_head, quantised.model.get_input_embeddings()
    if family == "llama":  # tied: the output layer is the embedding table, both stay dense
        assert type(head) is nn.Linear and type(table) is nn.Embedding and head.weight is table.weight
    else:  # the table in int8 rows; the output layer dense, except in int8 beside int4 layers
        assert isinstance(table, q.Int8Embedding)
        assert isinstance(head, q.Int8Linear) if mode == "int4" else type(head) is nn.Linear
    cosine = torch.nn.functional.cosine_similarity(_last_logits(quantised), reference, dim=-1)
    assert cosine.min() >= COSINE_BOUND[mode], cosine
    if family == "chatglm3" and mode == "int8":  # weight-only, and logits well apart: the same next token
        assert _last_logits(quantised).argmax(-1).tolist() == reference.argmax(-1).tolist()


TEXT = (
    "The quick brown fox jumps over the lazy dog. A server that many people use at once must keep "
    "each conversation apart, answer quickly, and never lose a request. Quantised weights let a "
    "large model fit on a small machine: each weight is stored in fewer bits, with a scale that "
    "restores its size. The cost is a little precision, which shows in the model's next-token "
    "choices. 今天北京的天气怎么样？北京今天晴，气温二十二度。def add(a, b):\n    return a + b\n"
) * 2


@pytest.fixture(scope="module")
def smollm2_choices(smollm2) -> tuple[torch.Tensor, torch.Tensor]:
    """TEXT's ids and the float32 model's next-token choices at every position: computed once for
    the three modes (the model is only read; each mode quantises its own copy)."""
    ids = torch.tensor([smollm2.template.encode_messages([{"role": "user", "content": TEXT}])])
    with torch.inference_mode():
        return ids, smollm2.model(input_ids=ids).logits[0].argmax(-1)


@pytest.mark.parametrize("mode, bound", [("int8", 0.95), ("w8a8", 0.85), ("int4", 0.6)])
def test_a_real_model_keeps_its_next_token_choices(smollm2, smollm2_choices, mode, bound):
    """SmolLM2's real weights, every position of a ~300-token text: the share of next-token
    choices (argmax) that stay those of the float32 model. Measured 0.965 / 0.927 / 0.750; over
    700 tokens of README text 0.967 / 0.867 / 0.649 (int8 changes a choice only where two
    tokens were nearly tied: its perplexity is the unquantised model's).

    int4 runs as a server with ``--quantize int4`` does on CPU: its start-up timing
    (choose_kernels) sends wide calls to the codes dequantised from torch's packing, since
    tinygemm's CPU kernel reads the weight once per row (all ~300 rows through it took ~30 s,
    dequantised ~1 s); the kernel itself then serves the first positions, which must give the
    same logits."""
    ids, reference = smollm2_choices
    model = copy.deepcopy(smollm2.model)
    report = q.quantize_model(model, mode)
    int4 = [m for m in model.modules() if isinstance(m, q.Int4Linear)]
    if int4:
        choose_kernels(model, torch.float32, widths=(1, 8, 32))
        assert all(m.dequant_rows is not None and m.dequant_rows < ids.shape[1] for m in int4)
    with torch.inference_mode():
        got = model(input_ids=ids).logits[0]
    agree = (got.argmax(-1) == reference).float().mean().item()
    assert report.modules == 30 * 7  # tied embeddings: the table and the output layer stay dense
    assert agree >= bound, agree
    if int4:  # the kernel at every width, over the first 8 positions (causal: the same logits there)
        for module in int4:
            module.dequant_rows = None
        with torch.inference_mode():
            head = model(input_ids=ids[:, :8]).logits[0]
        torch.testing.assert_close(head, got[:8], rtol=0, atol=1e-4 * float(got[:8].abs().max()))


@pytest.mark.parametrize("mode", MODES)
def test_the_weights_take_what_their_bits_say(mode, chatglm3_dir, tmp_path):
    """Each quantised module holds 8 or 4 bits a weight plus its scales (one per row, or two per
    group of inputs): at most a fifth more."""
    loaded = _load(chatglm3_dir, mode, tmp_path)
    report = q.report(loaded.model, mode, torch.float32)
    # per layer q, k, v (ChatGLM3's fused qkv, split), o, gate_up, down; the table; under int4 the head
    assert report.modules == 2 * 6 + 1 + (mode == "int4")
    for module in loaded.model.modules():
        if isinstance(module, q.QUANTIZED):
            weights = module.weight_shape[0] * module.weight_shape[1]
            bits = 4 if isinstance(module, q.Int4Linear) else 8
            assert weights * bits / 8 < q.quantized_bytes(module) <= weights * bits / 8 * 1.2
    dense = sum(t.numel() * t.element_size() for t in _load(chatglm3_dir, "none", tmp_path).model.state_dict().values())
    held = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    assert held < dense / (5 if mode == "int4" else 2.5)  # float32: 4x or 8x less, the dense head aside


@pytest.mark.parametrize("mode", MODES)
def test_batched_answers_equal_single_answers_under_quantisation(mode, chatglm3_dir, tmp_path):
    """Through the real engine: alone, then all together sharing a system prompt (prefix-cache
    hits on the second pass), and once more constrained to JSON."""
    loaded = _load(chatglm3_dir, mode, tmp_path)
    engine = TransformersChatEngine(loaded, "tiny", max_running=8, kv_cache_tokens=2048)
    system = {"role": "system", "content": "You are a careful assistant. 你好。" * 4}
    prompts = [loaded.template.encode_messages([system, {"role": "user", "content": x}]) for x in QUESTIONS]

    async def collect(prompt, params, request_id):
        ids, text = [], ""
        async for chunk in engine.generate(prompt, params, request_id):
            ids += chunk.token_ids
            text += chunk.text
        return ids, text

    async def scenario():
        alone = [await collect(p, GREEDY, f"a{i}") for i, p in enumerate(prompts)]
        together = await asyncio.gather(*[collect(p, GREEDY, f"t{i}") for i, p in enumerate(prompts)])
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        grammar = engine.compile_constraint(Constraint("json_schema", json.dumps(schema)))
        constrained = await collect(prompts[0], SamplingParams(max_tokens=60, temperature=0.0, grammar=grammar), "c")
        return alone, together, constrained

    engine.start()
    try:
        alone, together, constrained = asyncio.run(scenario())
    finally:
        engine.stop()
    assert together == alone
    assert engine.stats.cached_prompt_tokens > 0  # the shared system prompt came from the cache
    assert isinstance(json.loads(constrained[1]).get("ok"), bool)


@pytest.mark.parametrize("rows", [1, 8, 9, 192, 193, 300])
@pytest.mark.parametrize("mode", MODES)
def test_every_kernel_width_computes_the_same_product(mode, rows):
    """Narrow calls (decode), wide ones (many streams) and prompt chunks each take another
    kernel; each gives the dense product of the weights it holds, and a row's result does not
    depend on the rows beside it."""
    torch.manual_seed(0)
    dense = nn.Linear(256, 96, bias=True)
    module = nn.Sequential(copy.deepcopy(dense))
    q.quantize_model(module, mode)
    x = torch.randn(rows, 256)
    others = x.clone()
    others[1:] = torch.randn(rows - 1, 256) * 10  # other rows, far larger
    with torch.inference_mode():
        got, expected, beside_others = module(x), dense(x), module(others)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min() >= (0.995 if mode != "int4" else 0.98)
    assert torch.equal(got[0], beside_others[0])


def test_int4_cpu_packing_is_row_local():
    """Int4Linear packs big weights block by block (bounded load memory): valid only while
    torch's CPU packing of a row depends on that row alone."""
    codes = torch.randint(0, 16, (3 * 4096 + 32, 256), dtype=torch.int32)
    whole = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    blocks = [torch._convert_weight_to_int4pack_for_cpu(codes[i : i + 4096], 1) for i in range(0, len(codes), 4096)]
    assert torch.equal(whole, torch.cat(blocks))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
def test_a_consumed_tensor_leaves_resident_memory_and_keeps_its_values(tmp_path):
    weights = {"a": torch.randn(4096, 2048), "b": torch.randn(16)}  # 32 MiB
    torch.save(weights, tmp_path / "shard.bin")
    seen = {}
    for key, tensor, release in iter_checkpoint(tmp_path / "shard.bin"):
        before = _status("RssFile")
        total = float(tensor.sum())  # every page read
        touched = _status("RssFile")
        release(tensor)
        seen[key] = (tensor, total, touched - before, touched - _status("RssFile"))
    tensor, total, grew, released = seen["a"]
    assert grew > 16 * 2**20 and released > 16 * 2**20  # pages came in, then left
    assert float(tensor.sum()) == total and torch.equal(tensor, weights["a"])  # read again from the file


def test_only_the_files_own_mapping_is_released(tmp_path):
    """Anonymous memory is never handed to madvise: released, it would read back as zeros."""
    anonymous = torch.randn(1024, 1024)
    copy_before = anonymous.clone()
    MappedFile(tmp_path / "not-mapped.bin").release(anonymous)
    assert torch.equal(anonymous, copy_before)


def test_each_replica_is_quantised_and_what_cannot_run_is_refused_at_start(chatglm3_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="glm_api")
    sources = ModelSources(ModelSource("tiny", chatglm3_dir), ())
    settings = make_settings(device="cpu,cpu", quantize="int8", max_running=2, kv_cache_tokens=256, cache_dir=tmp_path)
    registry = build_registry(settings, sources)
    for replica in registry.chat.replicas:
        assert any(isinstance(m, q.Int8Linear) for m in replica.engine.model.modules())
    assert "quantised 13 modules (int8)" in caplog.text
    with pytest.raises(ValueError, match="runs on cpu or cuda devices, not meta"):
        q.check_supported("int4", torch.device("meta"))
    with pytest.raises(ValueError, match="quantize"):
        build_registry(make_settings(device="cpu,cpu", device_map="balanced", quantize="int4"), sources)


@pytest.mark.parametrize("family", ["llama", "glm4"])
def test_a_transformers_folder_streams_into_the_same_quantised_model(family, tiny_llama_dir, tiny_glm4_dir, caplog):
    """Streamed tensor by tensor into quantised modules, the model is the one that
    from_pretrained + quantize_model makes (the same codes, the same logits), tied output layer
    included (the tiny Llama ties it to its embedding table)."""
    from transformers import AutoModelForCausalLM

    from glm_api.families.quantized_load import stream_quantized

    folder = tiny_llama_dir if family == "llama" else tiny_glm4_dir
    caplog.set_level("INFO", logger="glm_api")
    streamed = stream_quantized(folder, CPU, torch.float32, "int8")
    assert streamed is not None, caplog.text
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    q.quantize_model(whole, "int8")
    assert [type(m) for m in streamed.modules()] == [type(m) for m in whole.modules()]
    if family == "llama":  # still tied after the table was reloaded
        assert streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.inference_mode():
        assert torch.equal(streamed(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_a_checkpoint_named_otherwise_is_loaded_whole_then_quantised(tiny_llama_dir, tmp_path, caplog):
    """Names the model does not have (here a stray extra tensor) cannot be streamed by name: the
    folder still loads, through from_pretrained, and is quantised after, as logged."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_llama_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.extra_scale"] = torch.ones(4)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    caplog.set_level("INFO", logger="glm_api")
    loaded = load_chat_model(folder, CPU, torch.float32, tmp_path / "cache", quantize="int8")
    assert "checkpoint names differ from the model's (model.extra_scale)" in caplog.text
    assert _decoder_linears(loaded.model) == []
    assert "quantised 14 modules (int8)" in caplog.text  # 2 layers x 7 projections
