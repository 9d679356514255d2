"""The direct decode forward (glm_api/engines/direct_decode.py): decode steps computed from the
model's modules without transformers' forward give every row the logits transformers' own
forward gives it alone, for the layouts it takes (rope scaling and biases included); other
layouts keep transformers' forward."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from glm_api.engines.direct_decode import DirectDecoder
from glm_api.engines.paged_attention import install
from tests.engines.test_paged_kv import _assert_alone, _Harness, _random_rows, _stock_and_paged

SHAPE = {
    "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
}


def _paged(reference):
    model = copy.deepcopy(reference)
    install(model)
    return model


@pytest.mark.parametrize(
    "extra",
    [
        {"attention_bias": True, "mlp_bias": True},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}},
        # angles that may change with the length: computed per step, not looked up
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    ],
    ids=["biases", "llama3 rope", "linear rope", "dynamic rope"],
)
def test_llama_variants_decode_as_transformers_computes_them(extra):
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(**SHAPE, **extra)).eval()
    with torch.no_grad():  # biases start at zero: make them count
        for name, param in reference.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model = _paged(reference)
    rows, lens = _random_rows(random.Random(7), 8)
    harness = _Harness(model, blocks=200, block_size=4, chunk=64, max_running=8)
    direct = harness.runner.decode.direct
    assert direct is not None
    assert (direct._table is None) == (extra.get("rope_parameters", {}).get("rope_type") == "dynamic")
    harness.run(rows)
    assert harness.runner.decode.steps > 10
    _assert_alone(reference, rows, lens)


@pytest.mark.parametrize("kind", ["llama", "glm"])
def test_one_step_equals_the_models_own_forward_over_the_same_batch(kind):
    """The same decode batch through the direct forward and through transformers' forward (the
    paged attention plugged in): equal logits, so a difference is the direct forward's."""
    _, model = _stock_and_paged(kind)
    harness = _Harness(model, blocks=200, block_size=4, chunk=64, max_running=8)
    rows, _ = _random_rows(random.Random(3), 6)
    harness.run(rows)  # fills the pool with real keys/values
    step = harness.runner.decode
    tables = [list(range(1 + 3 * i, 4 + 3 * i)) for i in range(4)]  # blocks the rows wrote
    batch_rows = [(t, 5 + 2 * i, 11 + i) for i, t in enumerate(tables)]
    from glm_api.engines.decode_step import DecodeRows

    host = DecodeRows.build(batch_rows, len(batch_rows), 4)
    with torch.inference_mode():
        direct = step.direct(step._batch(host))
        own = step._eager_forward(step._batch(host), hooks=True)
    torch.testing.assert_close(direct, own, atol=2e-5, rtol=1e-4)


def test_other_layouts_keep_transformers_forward():
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=8)).eval()  # q/k norms: not a listed layout
    assert DirectDecoder.for_model(qwen3) is None
    _, latent = _stock_and_paged("glm4_moe_lite")
    assert DirectDecoder.for_model(latent) is None


@pytest.mark.parametrize("fused_rows", [1, 8], ids=["one-row steps fused", "every step fused"])
@pytest.mark.parametrize("kind", ["llama", "glm"])
def test_fused_projections_decode_to_the_same_logits(kind, fused_rows):
    """q, k, v (and Llama's gate, up) as one packed projection each, in steps of up to
    ``fused_rows`` rows (wider ones through the modules): same logits as alone."""
    from glm_api.families.dense_kernels import packed_linear_available

    if not packed_linear_available(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN in this build")
    reference, model = _stock_and_paged(kind)
    rows, lens = _random_rows(random.Random(9), 8)
    harness = _Harness(model, blocks=200, block_size=4, chunk=64, max_running=8)
    direct = harness.runner.decode.direct
    assert direct.fuse_projections(model, force=True, widths=(fused_rows,))
    assert direct.fused_rows == fused_rows
    assert all(layer.qkv is not None and (layer.gate_up or layer.fused_gate_up) for layer in direct.layers)
    harness.run(rows)
    assert harness.runner.decode.steps > 10
    _assert_alone(reference, rows, lens)


def test_fusion_is_decided_by_timing_and_logged(caplog):
    import logging

    from glm_api.families.dense_kernels import packed_linear_available

    if not packed_linear_available(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN in this build")
    _, model = _stock_and_paged("llama")
    harness = _Harness(model, blocks=50, block_size=4, chunk=64, max_running=4)
    direct = harness.runner.decode.direct
    with caplog.at_level(logging.INFO, logger="glm_api.engines.direct_decode"):
        fused = direct.fuse_projections(model, widths=(1, 4))
    line = next(r.getMessage() for r in caplog.records if "decode projections" in r.getMessage())
    assert ("fused" in line.split(":")[0]) == fused and "1 rows" in line and "4 rows" in line
    assert all((layer.qkv is not None) == fused for layer in direct.layers)
    assert direct.fused_rows in ((1, 4) if fused else (0,))


def test_a_second_start_fuses_as_the_first_from_the_stored_figures(tmp_path, monkeypatch, caplog):
    import logging

    from glm_api.families.dense_kernels import packed_linear_available
    from glm_api.families.timing_store import FILE_NAME, TimingStore

    if not packed_linear_available(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN in this build")
    _, model = _stock_and_paged("llama")
    first = _Harness(model, blocks=50, block_size=4, chunk=64, max_running=4).runner.decode.direct
    fused = first.fuse_projections(model, widths=(1, 4), timings=TimingStore(tmp_path / FILE_NAME))
    second = _Harness(model, blocks=50, block_size=4, chunk=64, max_running=4).runner.decode.direct
    monkeypatch.setattr(type(second), "_time_fusion", lambda *a: pytest.fail("timed again"))
    with caplog.at_level(logging.INFO, logger="glm_api.engines.direct_decode"):
        assert second.fuse_projections(model, widths=(1, 4), timings=TimingStore(tmp_path / FILE_NAME)) == fused
    assert second.fused_rows == first.fused_rows
    assert any("(stored timings)" in r.getMessage() for r in caplog.records if "decode projections" in r.getMessage())


def test_fused_copies_that_would_not_fit_memory_are_not_made(monkeypatch, caplog):
    import logging

    from glm_api.families import dense_kernels

    if not dense_kernels.packed_linear_available(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN in this build")
    _, model = _stock_and_paged("llama")
    harness = _Harness(model, blocks=50, block_size=4, chunk=64, max_running=4)
    monkeypatch.setattr(dense_kernels, "_available_bytes", lambda: 1024)
    monkeypatch.setattr(dense_kernels, "fused_projection", lambda *a: pytest.fail("a copy was made"))
    with caplog.at_level(logging.INFO, logger="glm_api.engines.direct_decode"):
        assert not harness.runner.decode.direct.fuse_projections(model, widths=(1, 4))
    assert any("fused copies would take" in r.getMessage() for r in caplog.records)
    assert harness.runner.decode.direct.fused_rows == 0
