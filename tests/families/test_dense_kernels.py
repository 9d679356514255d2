"""Dense float32 projections through oneDNN's packed linear, chosen by measurement at start-up
(issue 24 item 2): every shape is timed, a module is packed exactly where its figures say so,
the answers stay those of F.linear within float rounding (alone, batched, through the engine),
and unpacking restores the class's forward."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from glm_api.families import dense_kernels
from glm_api.families.dense_kernels import MIN_GAIN, pack_linears, packed_linear_available, unpack_linears

pytest_plugins = ["tests.fixtures.tiny_causal_lm"]
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not packed_linear_available(CPU, torch.float32), reason="no oneDNN in this build")


@pytest.fixture(autouse=True)
def _narrow_inputs_too(monkeypatch):
    monkeypatch.setattr(dense_kernels, "MIN_IN_FEATURES", 1)  # the tiny models' 64-wide projections


def _tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def _packed(model) -> list[nn.Linear]:
    return [m for m in model.modules() if "packed_weight" in m.__dict__]


def test_every_shape_is_timed_and_packed_exactly_where_its_figures_say(caplog):
    model = _tiny()
    with caplog.at_level(logging.INFO, logger="glm_api.families.dense_kernels"):
        figures = pack_linears(model, widths=(1, 8, 64))
    # q/o 64->64, k/v 64->32, gate/up 64->128, down 128->64, lm_head 64->128
    assert set(figures) == {(64, 64), (32, 64), (128, 64), (64, 128)}
    for shape, by_path in figures.items():
        assert set(by_path) == {"F.linear", "onednn packed"}
        assert all(set(ms) == {1, 8, 64} and all(v > 0 for v in ms.values()) for ms in by_path.values())
        wins = tuple(by_path["onednn packed"][w] * MIN_GAIN <= by_path["F.linear"][w] for w in (1, 8, 64))
        modules = [m for m in model.modules() if type(m) is nn.Linear and tuple(m.weight.shape) == shape]
        for m in modules:
            assert ("packed_weight" in m.__dict__) == any(wins), shape
            assert not any(wins) or m.packed_use == wins
    assert any("dense kernels chosen" in r.getMessage() for r in caplog.records)


def test_the_head_is_timed_only_at_the_rows_it_sees():
    """The output head computes logits for decoding rows and prompts' last positions only: with
    ``head_rows`` it is timed (and chosen) at widths up to that, the projections at all."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    figures = pack_linears(model, widths=(1, 8, 64), head_rows=8, force=True)
    assert set(figures[(96, 64)]["F.linear"]) == {1, 8}
    assert model.lm_head.packed_widths == (1, 8)
    assert model.model.layers[0].self_attn.q_proj.packed_widths == (1, 8, 64)
    x = torch.randn(40, 64)  # wider than any head width measured: the widest one's choice
    with torch.inference_mode():
        torch.testing.assert_close(model.lm_head(x), nn.functional.linear(x, model.lm_head.weight))


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_packed_projections_give_float_linears_answers(rows):
    model = _tiny()
    ids = torch.randint(1, 128, (1, rows))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        pack_linears(model, widths=(1, 8), force=True)
        assert len(_packed(model)) == 2 * 7 + 1
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert unpack_linears(model) == 15 and not _packed(model)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)  # the class's forward again


def test_bfloat16_weights_are_packed_too_where_the_cpu_has_bf16_kernels():
    if not packed_linear_available(CPU, torch.bfloat16):
        pytest.skip("no native bf16 kernels on this CPU")
    model = _tiny().to(torch.bfloat16)
    ids = torch.randint(1, 128, (1, 5))
    with torch.inference_mode():
        before = model(input_ids=ids).logits.float()
        pack_linears(model, widths=(1, 8), force=True)
        assert len(_packed(model)) == 15
        after = model(input_ids=ids).logits.float()
    torch.testing.assert_close(after, before, atol=2e-2, rtol=2e-2)  # bf16 rounding of another summation order


def test_each_input_takes_the_path_chosen_for_its_width():
    model = _tiny()
    pack_linears(model, widths=(1, 4, 8), force=True)
    proj = model.model.layers[0].self_attn.q_proj
    proj.packed_use = (True, True, False)  # packed at 1-4 rows, F.linear from 5 rows on
    with torch.inference_mode():
        for rows in (4, 9):
            x = torch.randn(1, rows, 64)
            expected = nn.functional.linear(x, proj.weight)
            torch.testing.assert_close(proj(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(proj(x), expected)  # 9 rows: F.linear itself


def test_copies_that_would_not_fit_memory_are_not_made(monkeypatch, caplog):
    model = _tiny()
    monkeypatch.setattr(dense_kernels, "MEMORY_SHARE", 0.0)
    with caplog.at_level(logging.INFO, logger="glm_api.families.dense_kernels"):
        assert pack_linears(model, widths=(1, 8)) == {}
    assert not _packed(model)
    assert any("F.linear kept" in r.getMessage() for r in caplog.records)


def test_the_engine_answers_the_same_with_packed_projections(tiny_llama_dir, tmp_path):
    from glm_api.engines.base import SamplingParams
    from glm_api.engines.chat_engine import TransformersChatEngine
    from glm_api.families.detect import load_chat_model

    prompts = []
    answers = []
    for pack in (False, True):
        loaded = load_chat_model(tiny_llama_dir, CPU, torch.float32, tmp_path / "cache")
        if pack:
            pack_linears(loaded.model, widths=(1, 4), force=True)
            assert _packed(loaded.model)
        prompts = [loaded.template.encode_messages([{"role": "user", "content": "x" * n}]) for n in (1, 9, 30, 70)]
        engine = TransformersChatEngine(loaded, "tiny", max_running=4)
        engine.start()
        try:
            answers.append(asyncio.run(_greedy_all(engine, prompts, SamplingParams)))
        finally:
            engine.stop()
    assert answers[0] == answers[1] and all(len(ids) > 1 for ids in answers[0])


async def _greedy_all(engine, prompts, params_type):
    async def one(prompt, i):
        ids = []
        async for chunk in engine.generate(prompt, params_type(max_tokens=12, temperature=0.0), f"r{i}"):
            ids += chunk.token_ids
        return ids

    return await asyncio.gather(*[one(p, i) for i, p in enumerate(prompts)])




def test_narrow_projections_keep_f_linear(monkeypatch):
    monkeypatch.setattr(dense_kernels, "MIN_IN_FEATURES", 128)
    model = _tiny()
    figures = pack_linears(model, widths=(1, 8), force=True)
    assert set(figures) == {(64, 128)}  # only down (128 wide in) was considered
    assert {tuple(m.weight.shape) for m in _packed(model)} == {(64, 128)}


def test_the_setting_turns_it_off():
    from glm_api.cli import settings_from_args

    assert settings_from_args([]).cpu_kernels == "auto"
    assert settings_from_args(["--cpu-kernels", "off"]).cpu_kernels == "off"
