"""GLM-4-9B-chat checkpoints (THUDM's remote-code layout) loaded natively match GLM-4's architecture.

GLM-4-9B-chat's modeling_chatglm is ChatGLM3's architecture (RMSNorm, fused qkv with bias,
multi-query groups, rotary on the first half of each head in interleaved pairs with base
10000 * rope_ratio, SwiGLU, separate output layer); only the sizes, ``rope_ratio`` (500, 10000
for the 1m variant) and the tokenizer differ. So the float64 reference forward written from that
architecture for ChatGLM3 (tests/fixtures/chatglm_reference.py, which shares no code with the
loader or transformers) is run here on the raw safetensors tensors of tiny GLM-4-shaped checkpoints.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from glm_api.engines.base import SamplingParams
from glm_api.engines.chat_engine import TransformersChatEngine
from glm_api.families.chatglm3 import is_chatglm3_folder, load_chatglm3
from glm_api.families.detect import detect_chat_family, load_chat_model
from glm_api.families.glm4_chat import Glm4ChatTemplate
from tests.engines.test_chat_batching import collect
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3
from tests.fixtures.chatglm_reference import raw_checkpoint, reference_greedy, reference_logits
from tests.fixtures.glm4_chat_tiny import build_tiny_glm4_chat

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tiny_glm4_chat_dir: Path):
    return load_chat_model(tiny_glm4_chat_dir, CPU, torch.float32, tiny_glm4_chat_dir / "cache")


def prompts(loaded) -> list[list[int]]:
    template = loaded.template
    return [
        template.encode_messages([{"role": "user", "content": "你好"}]),
        template.encode_messages(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the weather like in Beijing?"},
                {"role": "assistant", "content": "北京今天晴。"},
                {"role": "user", "content": "上海呢？"},
            ],
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        ),
        [5, 17, 300, 99, 3, 540, 7, 545],  # byte, merge and special ids
    ]


def test_detected_and_loaded_natively_with_glm4s_tokenizer(loaded, tiny_glm4_chat_dir: Path) -> None:
    assert is_chatglm3_folder(tiny_glm4_chat_dir)  # the ChatGLM weight path...
    assert detect_chat_family(tiny_glm4_chat_dir) == "chatglm3"
    assert loaded.family == "chatglm4"  # ...with GLM-4's own tokenizer and format
    assert isinstance(loaded.template, Glm4ChatTemplate)
    assert loaded.source == str(tiny_glm4_chat_dir) and loaded.context_length == 512


def test_logits_match_reference(loaded, tiny_glm4_chat_dir: Path) -> None:
    config, weights = raw_checkpoint(tiny_glm4_chat_dir)
    for ids in prompts(loaded):
        expected = reference_logits(config, weights, ids)
        with torch.no_grad():
            got = loaded.model(torch.tensor([ids])).logits[0].to(torch.float64)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_reference(loaded, tiny_glm4_chat_dir: Path) -> None:
    config, weights = raw_checkpoint(tiny_glm4_chat_dir)
    stop = set(loaded.template.stop_token_ids)
    for ids in prompts(loaded)[:2]:
        expected = reference_greedy(config, weights, ids, steps=10, stop=stop)
        with torch.no_grad():
            out = loaded.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=10, do_sample=False,
            )
        assert out[0, len(ids) :].tolist() == expected


def test_the_paged_engine_answers_as_the_reference(loaded, tiny_glm4_chat_dir: Path) -> None:
    """Through the engine (paged KV, batched rows, a shared system prompt found in the prefix
    cache): each answer is the reference's greedy continuation."""
    config, weights = raw_checkpoint(tiny_glm4_chat_dir)
    stop = set(loaded.template.stop_token_ids)
    system = {"role": "system", "content": "You are a helpful assistant. 请用中文回答。"}
    questions = ["你好", "What is the weather like in Beijing?", "上海明天的天气怎么样？", "def add(a, b):"]
    asked = [loaded.template.encode_messages([system, {"role": "user", "content": q}]) for q in questions]
    engine = TransformersChatEngine(loaded, "glm-4-9b-chat", max_running=4, kv_cache_tokens=1024,
                                    prefix_cache_tokens=512)

    async def answers():
        return await asyncio.gather(*[collect(engine, p, SamplingParams(max_tokens=10, temperature=0.0), f"r{i}")
                                      for i, p in enumerate(asked)])

    engine.start()
    try:
        first = asyncio.run(answers())
        cached_before = engine.stats.cached_prompt_tokens
        again = asyncio.run(answers())
    finally:
        engine.stop()
    assert engine.stats.cached_prompt_tokens - cached_before >= 4 * 16  # the second round reused the pool
    for prompt, out, out_again in zip(asked, first, again):
        expected = reference_greedy(config, weights, prompt, steps=10, stop=stop)
        assert out.ids == out_again.ids == expected
        assert out.text == loaded.template.decode(expected)


def test_config_and_model_facts(loaded, tiny_glm4_chat_dir: Path) -> None:
    config = loaded.model.config
    published = json.loads((tiny_glm4_chat_dir / "config.json").read_text())
    assert config.rope_parameters["rope_theta"] == 10000.0 * 500
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.rms_norm_eps == 1.5625e-07 and config.attention_bias
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (2, 16, 576)
    tok = loaded.template.tokenizer
    # glm-4-9b-chat's eos_token_id list: <|endoftext|>, <|user|>, <|observation|>
    assert loaded.model.generation_config.eos_token_id == published["eos_token_id"]
    assert set(published["eos_token_id"]) == loaded.template.stop_token_ids
    assert tok.pad_id == published["pad_token_id"] == loaded.model.generation_config.pad_token_id
    assert not loaded.model.training


def test_the_1m_variant_shape_matches_reference(tmp_path: Path) -> None:
    """glm-4-9b-chat-1m: four kv groups and rope_ratio 10000, otherwise the same layout."""
    folder = build_tiny_glm4_chat(tmp_path / "1m", seed=3, multi_query_group_num=4, rope_ratio=10000, seq_length=2048)
    model = load_chatglm3(folder, CPU, torch.float32)
    assert model.model.config.rope_parameters["rope_theta"] == 1e8 and model.context_length == 2048
    config, weights = raw_checkpoint(folder)
    ids = model.template.encode_messages([{"role": "user", "content": "Hello, how are you today?"}])
    with torch.no_grad():
        got = model.model(torch.tensor([ids])).logits[0].to(torch.float64)
    torch.testing.assert_close(got, reference_logits(config, weights, ids), atol=1e-4, rtol=1e-4)


def test_tokenizer_file_decides_the_format(tiny_glm4_chat_dir: Path, tmp_path: Path) -> None:
    """Without tokenizer_config.json the tiktoken tokenizer.model alone tells GLM-4 from ChatGLM3."""
    folder = Path(shutil.copytree(tiny_glm4_chat_dir, tmp_path / "copy"))
    (folder / "tokenizer_config.json").unlink()
    assert load_chatglm3(folder, CPU, torch.float32).family == "chatglm4"
    chatglm3 = build_tiny_chatglm3(tmp_path / "chatglm3")
    assert load_chatglm3(chatglm3, CPU, torch.float32).family == "chatglm3"


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda f: (f / "tokenizer.model").unlink(), r"tokenizer\.model.*not found"),
        (lambda f: (f / "tokenizer.model").write_text("not base64 at all\n"), r"tokenizer\.model.*line 1"),
        (lambda f: (f / "tokenizer.model").write_text("YQ== 0\nYg== 5\n"), r"ranks must be 0\.\.1"),
        (lambda f: (f / "tokenizer.model").write_text("YQ== 0\nYg== 1\n"), r"254 single bytes have no token"),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "padded_vocab_size": 512})
            ),
            r"549 tokens .* do not fit padded_vocab_size 512",
        ),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "vision_config": {"image_size": 1120}})
            ),
            r"GLM-4V \(vision\) checkpoints are not supported",
        ),
    ],
)
def test_broken_folder_gives_clear_error(tiny_glm4_chat_dir: Path, tmp_path: Path, break_it, message: str) -> None:
    folder = Path(shutil.copytree(tiny_glm4_chat_dir, tmp_path / "copy"))
    break_it(folder)
    with pytest.raises(ValueError, match=message):
        load_chatglm3(folder, CPU, torch.float32)
