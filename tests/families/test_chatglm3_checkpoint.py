"""ChatGLM3 checkpoints loaded into GlmForCausalLM match ChatGLM3's own architecture.

The reference (tests/fixtures/chatglm_reference.py) is written from the ChatGLM3 architecture
(THUDM's modeling_chatglm: RMSNorm, fused qkv with bias, grouped kv heads, rotary on the first
half of each head with interleaved pairs and base 10000 * rope_ratio, SwiGLU, separate output
layer) and runs on the raw checkpoint tensors in float64, so it shares no code with the loader
or transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from glm_api.families.chatglm3 import is_chatglm3_folder, load_chatglm3
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3
from tests.fixtures.chatglm_reference import raw_checkpoint, reference_greedy, reference_logits

# Fixtures tiny_chatglm3_dir / tiny_chatglm3_safetensors_dir: tests.fixtures.chatglm3_tiny,
# registered by the root conftest.

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def reference(tiny_chatglm3_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return raw_checkpoint(tiny_chatglm3_dir)


@pytest.fixture(scope="module")
def loaded(tiny_chatglm3_dir: Path):
    return load_chatglm3(tiny_chatglm3_dir, CPU, torch.float32)


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
            ]
        ),
        [5, 17, 42, 99, 3, 250, 7],
    ]


def test_logits_match_reference(loaded, reference) -> None:
    config, weights = reference
    for ids in prompts(loaded):
        expected = reference_logits(config, weights, ids)
        with torch.no_grad():
            got = loaded.model(torch.tensor([ids])).logits[0].to(torch.float64)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_reference(loaded, reference) -> None:
    config, weights = reference
    stop = set(loaded.template.stop_token_ids)
    for ids in prompts(loaded)[:2]:
        expected = reference_greedy(config, weights, ids, steps=10, stop=stop)
        with torch.no_grad():
            out = loaded.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=10, do_sample=False,
            )
        assert out[0, len(ids) :].tolist() == expected


def test_config_and_model_facts(loaded, tiny_chatglm3_dir: Path) -> None:
    config = loaded.model.config
    assert loaded.family == "chatglm3" and loaded.source == str(tiny_chatglm3_dir)
    assert loaded.context_length == 256
    assert config.rope_parameters["rope_theta"] == 40000.0  # 10000 * rope_ratio 4
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (2, 16, 448)
    assert not config.tie_word_embeddings
    tok = loaded.template.tokenizer
    expected_stop = [tok.eos_id, tok.special_id("<|user|>"), tok.special_id("<|observation|>")]
    assert loaded.model.generation_config.eos_token_id == expected_stop
    assert set(expected_stop) == loaded.template.stop_token_ids
    assert not loaded.model.training
    assert all(not p.requires_grad and p.device == CPU for p in loaded.model.parameters())


def _state(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def test_safetensors_and_single_bin_load_identically(
    loaded, tiny_chatglm3_safetensors_dir: Path, tmp_path: Path
) -> None:
    single = build_tiny_chatglm3(tmp_path / "single", weights_format="bin-single")
    expected = _state(loaded.model)
    for folder in (tiny_chatglm3_safetensors_dir, single):
        got = _state(load_chatglm3(folder, CPU, torch.float32).model)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name


def test_legacy_torch_save_format_loads(loaded, tmp_path: Path) -> None:
    """Pre-zip torch.save files cannot be memory-mapped: they are read whole instead."""
    folder = build_tiny_chatglm3(tmp_path / "legacy", weights_format="bin-single")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    got = _state(load_chatglm3(folder, CPU, torch.float32).model)
    assert all(torch.equal(got[name], tensor) for name, tensor in _state(loaded.model).items())


@pytest.mark.parametrize("fixture", ["tiny_chatglm3_dir", "tiny_chatglm3_safetensors_dir"])
def test_weights_do_not_alias_the_files(loaded, fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Writing over a weights file in place must not change a loaded model (mmap views would)."""
    folder = _copy(request.getfixturevalue(fixture), tmp_path)
    model = load_chatglm3(folder, CPU, torch.float16).model
    for shard in [*folder.glob("*.bin"), *folder.glob("*.safetensors")]:
        with open(shard, "r+b") as f:
            f.write(b"\0" * shard.stat().st_size)
    got = _state(model)
    for name, tensor in _state(loaded.model).items():
        assert torch.equal(got[name].float(), tensor), name


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_shard(folder: Path, shard: str, edit) -> None:
    state = torch.load(folder / shard, weights_only=True)
    edit(state)
    torch.save(state, folder / shard)
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | {k: shard for k in state}
    index_path.write_text(json.dumps(index))


def test_missing_weight_is_named(tiny_chatglm3_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_chatglm3_dir, tmp_path)
    _edit_shard(folder, "pytorch_model-00002-of-00002.bin", lambda s: s.pop("transformer.output_layer.weight"))
    with pytest.raises(ValueError, match=r"missing.*lm_head\.weight"):
        load_chatglm3(folder, CPU, torch.float32)


def test_unexpected_weight_is_named(tiny_chatglm3_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_chatglm3_dir, tmp_path)
    extra = "transformer.prefix_encoder.embedding.weight"
    _edit_shard(folder, "pytorch_model-00002-of-00002.bin", lambda s: s.update({extra: torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"unexpected.*prefix_encoder"):
        load_chatglm3(folder, CPU, torch.float32)


def test_shape_mismatch_is_named(tiny_chatglm3_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_chatglm3_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["ffn_hidden_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\..*shape"):
        load_chatglm3(folder, CPU, torch.float32)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda f: (f / "tokenizer.model").unlink(), r"tokenizer\.model.*not found"),
        (lambda f: (f / "tokenizer.model").write_bytes(b"not a model"), r"tokenizer\.model.*sentencepiece"),
        (lambda f: (f / "config.json").write_text("{broken"), r"config\.json.*JSON"),
        (lambda f: (f / "config.json").unlink(), r"config\.json.*not found"),
        (
            lambda f: (f / "config.json").write_text(json.dumps({"model_type": "chatglm", "hidden_size": 64})),
            r"config\.json.*'num_attention_heads'",
        ),
        (lambda f: (f / "pytorch_model-00001-of-00002.bin").unlink(), r"shard files missing"),
        (lambda f: (f / "pytorch_model-00001-of-00002.bin").write_bytes(b"garbage"), r"00001.*cannot read"),
    ],
)
def test_broken_folder_gives_clear_error(tiny_chatglm3_dir: Path, tmp_path: Path, break_it, message: str) -> None:
    folder = _copy(tiny_chatglm3_dir, tmp_path)
    break_it(folder)
    with pytest.raises(ValueError, match=message):
        load_chatglm3(folder, CPU, torch.float32)


def test_is_chatglm3_folder(tiny_chatglm3_dir: Path, tmp_path: Path) -> None:
    assert is_chatglm3_folder(tiny_chatglm3_dir)
    assert not is_chatglm3_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert not is_chatglm3_folder(tmp_path)


def test_bf16_load(loaded, tiny_chatglm3_dir: Path) -> None:
    bf16 = load_chatglm3(tiny_chatglm3_dir, CPU, torch.bfloat16)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([prompts(loaded)[1]])
    with torch.no_grad():
        low = bf16.model(ids).logits[0].float()
        full = loaded.model(ids).logits[0]
    assert torch.isfinite(low).all()
    cosine = torch.nn.functional.cosine_similarity(low, full, dim=-1)
    assert cosine.min() > 0.99
