"""Start-up kernel timings kept between starts (``--kernel-timings``, under ``--cache-dir``): a
second start on the same machine reuses the first one's figures and makes the same choices
without timing again; another thread count (part of the machine key) or ``fresh`` times
again; a store that cannot be read or written never stops a start."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from glm_api.families import dense_kernels
from glm_api.families.dense_kernels import pack_linears, packed_linear_available, unpack_linears
from glm_api.families.quant_kernels import choose_kernels
from glm_api.families.quantize import quantize_model
from glm_api.families.timing_store import FILE_NAME, TimingStore, machine_key

CPU = torch.device("cpu")


def _tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


class _Counting:
    """A measurement that counts its calls and returns new figures each time."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"a": {1: 0.5 * self.calls, 32: 2.0}, "b": {1: 0.25, 32: 3.0 + self.calls}}


def test_figures_are_kept_and_reused_with_their_widths(tmp_path):
    store = TimingStore(tmp_path / FILE_NAME)
    measure = _Counting()
    first, reused = store.figures("dense", "64x64", measure)
    assert (measure.calls, reused) == (1, False)
    again, reused = TimingStore(tmp_path / FILE_NAME).figures("dense", "64x64", measure)  # a later start
    assert (measure.calls, reused) == (1, True)
    assert again == first and all(isinstance(w, int) for by_width in again.values() for w in by_width)
    other, reused = store.figures("dense", "64x128", measure)  # another key is timed
    assert (measure.calls, reused, other["a"][1]) == (2, False, 1.0)


def test_fresh_times_again_and_keeps_the_new_figures(tmp_path):
    measure = _Counting()
    TimingStore(tmp_path / FILE_NAME).figures("dense", "k", measure)
    fresh, reused = TimingStore(tmp_path / FILE_NAME, fresh=True).figures("dense", "k", measure)
    assert (measure.calls, reused, fresh["a"][1]) == (2, False, 1.0)
    kept, reused = TimingStore(tmp_path / FILE_NAME).figures("dense", "k", measure)
    assert (measure.calls, reused, kept) == (2, True, fresh)


def test_another_thread_count_is_another_machine(tmp_path):
    threads = torch.get_num_threads()
    store, measure = TimingStore(tmp_path / FILE_NAME), _Counting()
    try:
        torch.set_num_threads(1)
        one = machine_key()
        store.figures("dense", "k", measure)
        torch.set_num_threads(2)
        assert machine_key() != one
        _, reused = store.figures("dense", "k", measure)
    finally:
        torch.set_num_threads(threads)
    assert (measure.calls, reused) == (2, False)


@pytest.mark.parametrize("damage", ["a file where the folder should be", "not a database"])
def test_a_store_that_cannot_be_used_never_stops_a_start(tmp_path, damage, caplog):
    if damage == "not a database":
        path = tmp_path / FILE_NAME
        path.write_bytes(b"\x00garbage" * 512)
    else:
        (tmp_path / "cache").write_text("a file")
        path = tmp_path / "cache" / FILE_NAME
    store, measure = TimingStore(path), _Counting()
    with caplog.at_level(logging.WARNING, logger="glm_api.families.timing_store"):
        for _ in range(2):
            figures, reused = store.figures("dense", "k", measure)
            assert not reused and figures["a"][32] == 2.0
    assert measure.calls == 2
    assert sum("not kept between starts" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(not packed_linear_available(CPU, torch.float32), reason="no oneDNN in this build")
def test_a_second_start_packs_the_same_modules_from_the_stored_figures(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(dense_kernels, "MIN_IN_FEATURES", 1)  # the tiny model's 64-wide projections
    model = _tiny()
    first = pack_linears(model, widths=(1, 8), timings=TimingStore(tmp_path / FILE_NAME))
    chosen = {name: m.packed_use for name, m in model.named_modules() if "packed_weight" in m.__dict__}
    unpack_linears(model)
    monkeypatch.setattr(dense_kernels, "fastest_ms", lambda *a, **k: pytest.fail("timed again"))
    with caplog.at_level(logging.INFO, logger="glm_api.families.dense_kernels"):
        second = pack_linears(model, widths=(1, 8), timings=TimingStore(tmp_path / FILE_NAME))
    assert second == first  # measured floats, equal only when read back
    assert {name: m.packed_use for name, m in model.named_modules() if "packed_weight" in m.__dict__} == chosen
    assert all("(stored timings)" in r.getMessage() for r in caplog.records if "ms at" in r.getMessage())


def test_a_second_start_sets_the_same_quantised_crossovers_from_the_stored_figures(tmp_path, monkeypatch):
    from glm_api.families import quant_kernels

    model = _tiny()
    quantize_model(model, "int8")
    first = choose_kernels(model, torch.float32, widths=(1, 8, 64), timings=TimingStore(tmp_path / FILE_NAME))
    crossovers = [m.dequant_rows for m in model.modules() if hasattr(m, "dequant_rows")]
    for m in model.modules():
        if hasattr(m, "dequant_rows"):
            m.dequant_rows = None
    monkeypatch.setattr(quant_kernels, "fastest_ms", lambda *a, **k: pytest.fail("timed again"))
    second = choose_kernels(model, torch.float32, widths=(1, 8, 64), timings=TimingStore(tmp_path / FILE_NAME))
    assert [t.ms for t in second] == [t.ms for t in first] and all(t.reused for t in second)
    assert [m.dequant_rows for m in model.modules() if hasattr(m, "dequant_rows")] == crossovers
    assert all("(stored timings)" in t.line() for t in second)

