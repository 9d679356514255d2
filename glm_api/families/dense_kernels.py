"""Dense projections (float32, bfloat16) through oneDNN's packed linear on CPU, chosen by measurement at
start-up (issue 24 item 2).

A decode step multiplies a few rows by every weight matrix once, so one stream's speed is the
speed of these skinny products. On the 2-core dev CPU (AMD EPYC, AVX-512) ``F.linear`` in
float32 (MKL sgemm) read SmolLM2-135M's weights at 5-12 GB/s, against ~18 GB/s for a large
matrix-vector product; oneDNN's linear over a weight reordered once for it
(``torch.ops.mkldnn._linear_pointwise``, what inductor's freezing uses) ran the same products
1.1-2.9x faster at 1 to 32 rows, and no slower for a 512-row prompt chunk
(``bench/bench_matmul.py`` has every path and figure). Same arithmetic: the answers agree with
``F.linear`` within float rounding. A bfloat16 model on a CPU with native bf16 kernels
(``--dtype bfloat16``) gets the same treatment over its bf16 weights.

:func:`pack_linears` times, per distinct projection shape, ``F.linear`` against the packed path
over the model's modules of that shape (enough of them that the weights stream from memory
as in a real step) at the widths steps carry (one stream's decode, every running stream's decode, a
prompt chunk), and gives each module a packed copy of its weight where the packed path wins at
some width. An input takes the path that won at the nearest measured width at or above its rows
(the widest one for wider inputs). The original weight stays (tied embeddings, adapters
and checkpoints read it), so packing costs a second copy of the weights: it is skipped, with a
log line, when that copy would take more than :data:`MEMORY_SHARE` of the memory available.
A weight changed after packing must be packed again (:func:`unpack_linears`, then pack again).
"""

from __future__ import annotations

import logging
import os
import time
import types
from bisect import bisect_left
from collections.abc import Callable

import torch
from torch import nn

from glm_api.families.kernel_timing import fastest_ms
from glm_api.families.timing_store import Figures, TimingStore
from glm_api.families.timing_store import timed as timed_figures
from glm_api.units import byte_size

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16)
#: The packed copies may take at most this share of the memory available at start-up.
MEMORY_SHARE = 0.25
#: Seconds spent timing one candidate at one width.
TIME_PER_CANDIDATE = 0.03
#: Narrower inputs keep F.linear: the 2-layer probe's 64-wide head timed faster packed alone at
#: start-up, yet made its whole decode step 2.8x slower (5.3 ms against 1.9; bench/profile_decode.py).
MIN_IN_FEATURES = 256
#: The packed path must be at least this much faster to be used (timing noise on a busy CPU).
MIN_GAIN = 1.05
#: Modules of one shape timed together weigh at least this much (past a server CPU's last-level
#: cache, so the weights stream from memory as in a real step) - not all of them: timing all 60
#: of SmolLM2's 576->1536 projections at a 512-row chunk made start-up ~10 s longer.
TIMED_BYTES = 96 * 2**20


def packed_linear_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed linear exists for ``dtype`` (float32; bfloat16 where the CPU has native
    bf16 kernels) on this CPU build."""
    return (
        device.type == "cpu"
        and dtype in _DTYPES
        and torch.backends.mkldnn.is_available()
        and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // self.in_features
    # The measured width at or above ``rows`` (the widest for wider inputs) says which path.
    use = self.packed_use[min(bisect_left(self.packed_widths, rows), len(self.packed_widths) - 1)]
    if not use or x.dtype != self.weight.dtype or torch.is_grad_enabled():
        return nn.functional.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def copies_fit(extra: int, refused: str, logger: logging.Logger = log) -> bool:
    """Whether ``extra`` bytes of weight copies stay within :data:`MEMORY_SHARE` of the memory
    available now; if not, logs ``refused`` on ``logger`` (a format taking the copies' size, then
    what is available)."""
    available = _available_bytes()
    if available is not None and extra > MEMORY_SHARE * available:
        logger.info(refused, byte_size(extra), byte_size(available))
        return False
    return True


def _available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


@torch.inference_mode()
def pack_linears(
    model: nn.Module, widths: tuple[int, ...], *, force: bool = False, head_rows: int | None = None,
    timings: TimingStore | None = None,
) -> dict[tuple[int, int], Figures]:
    """Give ``model``'s float32 ``nn.Linear`` projections the packed path where it measured
    faster (see the module docstring; ``force``: everywhere, whatever the figures); returns the
    figures (ms per module) per (out, in) shape and logs them with the choice made.
    ``head_rows``: the most rows the output head sees in a step (it computes logits only for
    decoding rows and each prompt's last position): its shape is timed at widths up to that
    (timing a vocabulary-wide head at a prompt chunk's width took seconds of start-up).
    ``timings``: figures kept from an earlier start on this machine are reused (and new ones kept)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups: dict[tuple[int, int], list[nn.Linear]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and module.in_features >= MIN_IN_FEATURES
            and packed_linear_available(weight.device, weight.dtype)
        ):
            # the head apart from projections of its shape: it may be timed at other widths
            apart = module is head and head_rows is not None
            groups.setdefault((*weight.shape, weight.dtype, apart), []).append(module)
    if not groups:
        return {}
    extra = sum(m.weight.nbytes for modules in groups.values() for m in modules)
    if not copies_fit(extra, "dense kernels: F.linear kept (packed copies would take %s of the %s available)"):
        return {}
    started = time.perf_counter()
    widths = tuple(sorted(set(widths)))
    figures: dict[tuple[int, int], Figures] = {}
    packed_bytes = 0
    for (*shape, dtype, is_head), modules in groups.items():
        shape = (shape[0], shape[1])
        group_widths = widths
        if is_head:
            group_widths = tuple(w for w in widths if w <= head_rows) or widths[:1]
        packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight, group_widths[-1]) for m in modules]
        timed = max(1, min(len(modules), -(-TIMED_BYTES // modules[0].weight.nbytes)))
        pairs = list(zip(packed, modules))[:timed]

        def measure() -> Figures:
            plain, fast = {}, {}
            for width in group_widths:
                x = torch.randn(width, shape[1], dtype=dtype)
                plain[width] = fastest_ms(
                    lambda: [nn.functional.linear(x, m.weight, m.bias) for _, m in pairs], TIME_PER_CANDIDATE
                ) / timed
                fast[width] = fastest_ms(
                    lambda: [torch.ops.mkldnn._linear_pointwise(x, p, m.bias, "none", [], "") for p, m in pairs],
                    TIME_PER_CANDIDATE,
                ) / timed
            return {"F.linear": plain, "onednn packed": fast}

        bias = modules[0].bias is not None
        key = f"{shape[0]}x{shape[1]} {dtype} head={is_head} widths={group_widths} timed={timed} bias={bias}"
        figures[shape], reused = timed_figures(timings, "dense", key, measure)
        plain, fast = figures[shape]["F.linear"], figures[shape]["onednn packed"]
        use = tuple(force or fast[w] * MIN_GAIN <= plain[w] for w in group_widths)
        line = ", ".join(
            f"{name} " + "/".join(f"{ms[w]:.3f}" for w in group_widths) for name, ms in figures[shape].items()
        ) + (" (stored timings)" if reused else "")
        widths_text = "/".join(map(str, group_widths))
        if not any(use):
            log.info("dense kernels %d->%d x%d: F.linear kept; ms at %s rows: %s", shape[1], shape[0], len(modules),
                     widths_text, line)
            continue
        for module, weight in zip(modules, packed):
            module.packed_weight = weight
            module.packed_widths, module.packed_use = group_widths, use
            module.forward = types.MethodType(_packed_forward, module)
        chosen = "/".join(str(w) for w, u in zip(group_widths, use) if u)
        log.info("dense kernels %d->%d x%d: oneDNN packed at %s rows; ms at %s rows: %s", shape[1], shape[0],
                 len(modules), chosen, widths_text, line)
        packed_bytes += sum(m.weight.nbytes for m in modules)
    log.info("dense kernels chosen in %.1f s; packed copies take %s", time.perf_counter() - started,
             byte_size(packed_bytes))
    return figures


def unpack_linears(model: nn.Module) -> int:
    """Drop the packed copies (before changing weights in place); returns how many modules had one."""
    count = 0
    for module in model.modules():
        if "packed_weight" in module.__dict__:
            del module.packed_weight, module.packed_widths, module.packed_use
            del module.forward  # back to the class's forward
            count += 1
    return count


def can_fuse(modules: list[nn.Module | None]) -> bool:
    """Whether :func:`fused_projection` can join ``modules`` (plain float ``nn.Linear`` modules of
    one input width, dtype and device, where the packed path exists)."""
    if not modules or any(type(m) is not nn.Linear for m in modules):
        return False
    first = modules[0].weight
    return all(
        m.weight.dtype == first.dtype and m.weight.device == first.device and m.in_features == first.shape[1]
        for m in modules
    ) and packed_linear_available(first.device, first.dtype)


def fused_projection(modules: list[nn.Module], hint_rows: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One packed projection computing ``modules``' outputs side by side (q, k, v; gate, up): a
    decode step then reads their weights in one pass, one kernel call instead of several.
    None where they are not plain float ``nn.Linear`` modules of one input on a CPU with the packed
    path. The caller splits the output by the modules' widths."""
    if not can_fuse(modules):
        return None
    weights = [m.weight for m in modules]
    first = weights[0]
    with torch.inference_mode():
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights), hint_rows)
        bias = None
        if any(m.bias is not None for m in modules):
            bias = torch.cat([m.bias if m.bias is not None else first.new_zeros(m.out_features) for m in modules])
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
