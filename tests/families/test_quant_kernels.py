"""Quantised kernels chosen by measurement at start-up (issue 24): every quantised projection
shape is timed against dense, int8 modules take the faster of their two kernels per width, the
log carries the figures, and the answers do not change."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from glm_api.families.quant_kernels import choose_kernels
from glm_api.families.quantize import Int4Linear, Int8Linear, quantize_model


def _tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("mode", ["int8", "w8a8", "int4"])
def test_each_quantised_shape_is_timed_and_the_log_shows_the_figures(mode, caplog):
    model = _tiny()
    quantize_model(model, mode)
    ids = torch.tensor([list(range(1, 40))])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    with caplog.at_level(logging.INFO, logger="glm_api.families.quant_kernels"):
        timings = choose_kernels(model, torch.float32, widths=(1, 8, 64))
    # q/o 64->64, k/v 64->32, gate/up 64->128, down 128->64: four shapes of decoder projections
    assert {t.shape for t in timings if t.kind == mode} == {(64, 64), (32, 64), (128, 64), (64, 128)}
    for t in timings:
        assert all(set(ms) == {1, 8, 64} and all(v > 0 for v in ms.values()) for ms in t.ms.values())
        assert any(t.line() in r.getMessage() for r in caplog.records)
    with torch.inference_mode():
        # the same codes: only the rounding of bf16 activations (int8pack) against float32 (dequantised) differs
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-2, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_modules_take_the_faster_kernel_at_each_measured_width(mode):
    """int8, and int4 on CPU: the kernel, or the codes dequantised for the call, per width."""
    model = _tiny()
    quantize_model(model, mode)
    widths = (1, 8, 64)
    timings = {(t.kind, t.shape): t for t in choose_kernels(model, torch.float32, widths=widths)}
    kind = Int8Linear if mode == "int8" else Int4Linear
    modules = [m for m in model.modules() if isinstance(m, kind)]
    assert modules
    for module in modules:
        ms = timings[mode, module.weight_shape].ms
        assert set(ms) == {mode, f"{mode} dequantised", "dense float32"}
        assert module.dequant_rows is not None
        # every width from the crossover up is one where dequantising measured faster
        for w in widths:
            if w > module.dequant_rows:
                assert ms[f"{mode} dequantised"][w] < ms[mode][w]
