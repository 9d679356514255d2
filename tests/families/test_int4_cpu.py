"""int4 on CPU: the codes read back from torch's packing, and wide calls dequantised from them
(glm_api/families/int4_cpu.py) give what the int4 kernel gives."""

from __future__ import annotations

import pytest
import torch

from glm_api.families import int4_cpu
from glm_api.families.quantized_modules import Int4Linear

CPU = torch.device("cpu")
# (out, in): whole 64-row blocks, blocks and a tail, a tail alone, SmolLM2's MLP shape
SHAPES = [(128, 64), (80, 64), (16, 32), (1536, 576), (4096 + 48, 256)]


@pytest.mark.parametrize(("out", "inp"), SHAPES)
def test_codes_read_back_are_the_codes_packed(out, inp):
    codes = torch.randint(0, 16, (out, inp), dtype=torch.int32, generator=torch.Generator().manual_seed(out))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(int4_cpu.codes_t(packed, inp).to(torch.int32), codes.t())


def _module(out: int, inp: int, dtype: torch.dtype = torch.float32) -> Int4Linear:
    torch.manual_seed(out + inp)
    module = Int4Linear(inp, out, False, CPU, dtype)
    module.load_weight(torch.randn(out, inp) * 0.02)
    return module


@pytest.mark.parametrize(("out", "inp"), SHAPES)
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_dequantised_product_matches_the_int4_kernel(out, inp, rows):
    module = _module(out, inp)
    x = torch.randn(rows, inp)
    expected = module.int4pack(x)
    got = module.dequantized(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_wide_weights_dequantise_a_chunk_at_a_time(monkeypatch):
    module = _module(4096 + 48, 256)
    x = torch.randn(5, 256)
    whole = module.dequantized(x)
    monkeypatch.setattr(int4_cpu, "CHUNK_BYTES", 256 * 4 * 640)  # 640 output columns a chunk: 7 chunks, tail last
    torch.testing.assert_close(module.dequantized(x), whole, rtol=1e-6, atol=1e-6)


def test_forward_dequantises_only_past_its_crossover(monkeypatch):
    from glm_api.families import quantized_modules as quantize

    module = _module(1536, 576)
    calls = []
    real = quantize.dequantized_mm
    monkeypatch.setattr(quantize, "dequantized_mm", lambda rows, *a: calls.append(rows.shape[0]) or real(rows, *a))
    x = torch.randn(8, 576)
    assert module.dequant_rows is None  # until start-up timing has checked the layout: the kernel
    narrow = module(x)
    module.dequant_rows = 4
    module(x[:4])
    assert calls == []
    module.dequant_rows = 7
    wide = module(x)  # 8 rows > 7: dequantised
    assert calls == [8]
    torch.testing.assert_close(wide, narrow, rtol=1e-4, atol=1e-4 * float(narrow.abs().max()))


def test_the_layout_check_fails_when_the_codes_are_read_wrongly(monkeypatch):
    module = _module(128, 64)
    args = (module.packed, module.scales_and_zeros, module.group_size)
    assert int4_cpu.unpacks_as_packed(*args)
    right = int4_cpu.codes_t
    monkeypatch.setattr(int4_cpu, "codes_t", lambda packed, inp: right(packed, inp).flip(1))  # rows reversed
    assert not int4_cpu.unpacks_as_packed(*args)
