"""Quantised matmul kernels chosen by measurement at start-up (``--quantize``; issue 24).

Whether a quantised kernel beats the dense matmul depends on the machine, not on the model:
on one 2-core AVX2 CPU, int4 (tinygemm) decoded SmolLM2 at 0.36x of float32, while on an
AVX-512 machine the same path ran 4.15x over bf16 for ChatGLM3-6B's shape. So after loading,
each distinct quantised projection shape of the model is timed at the row counts steps carry
(one stream's decode, ``max_rows`` streams' decode, a prompt chunk): the quantised kernel, the
int8 weight dequantised for a dense matmul (int8 only: the same codes, so the same answers),
and a dense matmul of the same shape in the compute dtype (what the memory saving costs).

- ``int8``: each module takes, per width, the faster of its two kernels (``_weight_int8pack_mm``
  or dequantise-then-matmul): the crossover ``Int8Linear.dequant_rows`` is set from the figures.
- ``int4`` on CPU likewise (tinygemm's CPU kernel or the codes dequantised for the call,
  :mod:`int4_cpu`, once checked against the kernel: ``Int4Linear.dequant_rows``); on CUDA
  tinygemm at every width.
- ``w8a8`` has no second kernel over the same codes.

When the quantised path is slower than dense at one stream's width, the log says so with the
figures.

Each timing is a few calls of one projection (tens of milliseconds for a 6B shape), so the whole
measurement takes a fraction of a second on small models and about a second on 6B shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from glm_api.families.int4_cpu import unpacks_as_packed
from glm_api.families.kernel_timing import fastest_ms
from glm_api.families.quantized_modules import Int4Linear, Int8Linear, has_kernel
from glm_api.families.timing_store import Figures, TimingStore, timed

log = logging.getLogger(__name__)

#: Seconds spent timing one candidate at one width (the fastest call counts; at least one after a
#: warm-up call).
TIME_PER_CANDIDATE = 0.02


@dataclass
class ShapeTiming:
    kind: str  # int8, w8a8, int4
    shape: tuple[int, int]  # (out, in)
    modules: int
    ms: Figures = field(default_factory=dict)  # candidate -> width -> ms
    reused: bool = False  # the figures are an earlier start's (a TimingStore's)

    def line(self) -> str:
        parts = []
        for name, by_width in self.ms.items():
            parts.append(f"{name} " + "/".join(f"{by_width[w]:.2f}" for w in sorted(by_width)))
        widths = "/".join(str(w) for w in sorted(next(iter(self.ms.values()))))
        stored = " (stored timings)" if self.reused else ""
        head = f"{self.kind} {self.shape[1]}->{self.shape[0]} x{self.modules}, ms at {widths} rows: "
        return head + ", ".join(parts) + stored


def _int4_dequantises(module: Int4Linear, device: torch.device) -> bool:
    """int4 on CPU with this torch's packing read back correctly (logged where it is not)."""
    if device.type != "cpu":
        return False
    if unpacks_as_packed(module.packed, module.scales_and_zeros, module.group_size):
        return True
    log.warning("int4: this torch packs CPU weights in a layout glm-api does not read; wide steps keep the int4 "
                "kernel (slow past a few rows)")
    return False


def _kind(module: nn.Module) -> str:
    if isinstance(module, Int4Linear):
        return "int4"
    return "w8a8" if module.int8_activations else "int8"


@torch.inference_mode()
def choose_kernels(model: nn.Module, dtype: torch.dtype, widths: tuple[int, ...],
                   timings: TimingStore | None = None) -> list[ShapeTiming]:
    """Time the model's quantised projections (one module per distinct shape and kind) at
    ``widths`` rows, set each int8 module's crossover to the faster kernel, and log the figures
    (a warning where the quantised path is slower than dense at the narrowest width).
    ``timings``: figures kept from an earlier start on this machine are reused (and new ones kept)."""
    groups: dict[tuple[str, tuple[int, int]], list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            groups.setdefault((_kind(module), module.weight_shape), []).append(module)
    results = []
    for (kind, shape), modules in groups.items():
        first = modules[0]
        device = first.qweight.device if isinstance(first, Int8Linear) else first.packed.device
        timing = ShapeTiming(kind, shape, len(modules))
        two_kernels = kind == "int8" or (kind == "int4" and _int4_dequantises(first, device))
        dense_name, deq_name = f"dense {str(dtype).removeprefix('torch.')}", f"{kind} dequantised"

        def measure() -> Figures:
            dense = torch.randn(shape, dtype=dtype, device=device) * 0.02
            quantized, dequantized, plain = {}, {}, {}
            for width in widths:
                x = torch.randn(width, shape[1], dtype=dtype, device=device)
                if kind == "int8" and has_kernel("_weight_int8pack_mm", device.type):
                    quantized[width] = fastest_ms(lambda: first.int8pack(x), TIME_PER_CANDIDATE, device)
                elif kind == "int4":  # the kernel itself, whatever crossover an earlier timing set
                    rows = x.to(first.act_dtype)
                    quantized[width] = fastest_ms(lambda: first.int4pack(rows), TIME_PER_CANDIDATE, device)
                else:  # w8a8; int8 without the packed kernel here always dequantises
                    quantized[width] = fastest_ms(lambda: first.forward(x), TIME_PER_CANDIDATE, device)
                plain[width] = fastest_ms(lambda: nn.functional.linear(x, dense), TIME_PER_CANDIDATE, device)
                if two_kernels:
                    dequantized[width] = fastest_ms(lambda: first.dequantized(x), TIME_PER_CANDIDATE, device)
            return {kind: quantized, **({deq_name: dequantized} if dequantized else {}), dense_name: plain}

        key = f"{kind} {shape[0]}x{shape[1]} {dtype} widths={tuple(widths)} two_kernels={two_kernels}"
        timing.ms, reused = timed(timings, "quantised", key, measure, device)
        quantized, dequantized = timing.ms[kind], timing.ms.get(deq_name, {})
        timing.reused = reused
        if two_kernels:
            # The narrowest width from which dequantising wins (and stays winning) above it. Never
            # one row: a one-row call reads each weight once either way, and a dense copy written
            # per call won only when timed alone, its codes cache-hot (SmolLM2 int4 576->576: 0.25
            # against 0.33 ms), while through the engine one stream decoded at 3.2-3.6 tokens/s
            # dequantised against 6.1-6.3 with the kernel.
            crossover = next(
                (w for w in sorted(widths) if w > 1 and all(dequantized[v] < quantized[v] for v in widths if v >= w)),
                None,
            )
            for module in modules:
                module.dequant_rows = (crossover - 1) if crossover is not None else max(widths)
        results.append(timing)
        narrow = min(widths)
        best = min(quantized[narrow], dequantized.get(narrow, float("inf")))
        if best > timing.ms[dense_name][narrow]:
            log.warning(
                "--quantize %s is slower than dense %s on this machine for one stream: %s "
                "(speed depends on the CPU's instruction set; the memory saving stays)",
                kind, str(dtype).removeprefix("torch."), timing.line(),
            )
        else:
            log.info("quantised kernels: %s", timing.line())
    return results
