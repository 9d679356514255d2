"""One-row and few-row matmuls for SmolLM2-135M's real shapes, through every CPU path torch has
(issue 24 item 2).

    python bench/bench_matmul.py                 # ~2 minutes on the 2-core dev CPU
    python bench/bench_matmul.py --rows 1 4      # fewer widths

A decode step multiplies a few rows by every weight matrix once; note-24's profile put ``aten::mm``
at ~75% of a step, at about half the bandwidth of a float32 matrix-vector product. Here each
path computes ``x [M, in] @ W.T`` for the model's shapes, with the weight cycled through copies
that together exceed the last-level cache (as in a real step, where 538 MB of weights stream
from memory), and prints ms per product and the GB/s of weight bytes read (float32 bytes for
every path, so that the figures compare with the bandwidth line at the top):

- ``linear``: ``F.linear(x, W)`` (what transformers' ``nn.Linear`` runs: MKL sgemm here);
- ``mv``: ``torch.mv(W, x[0])`` (one row only: MKL sgemv);
- ``mm_t``: ``torch.mm(x, Wt)`` against a pre-transposed contiguous ``Wt [in, out]``;
- ``mkl_packed``: MKL's packed sgemm (``torch.ops.mkl._mkl_linear``, the weight reordered once);
- ``onednn_f32`` / ``onednn_bf16``: oneDNN's linear over a weight reordered once for the width
  (``torch.ops.mkldnn._linear_pointwise``: what inductor's freezing uses on CPU);
- ``mkldnn_module``: ``torch.utils.mkldnn.to_mkldnn(nn.Linear)`` (converts x each call);
- ``bf16``: ``F.linear`` over a bfloat16 copy of the weight, x converted there and back (half the
  bytes; AVX-512 bf16 where the CPU has it);
- ``compiled``: ``torch.compile`` (inductor, freezing) of a module holding the copies.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from bench.bench_decode import bandwidth_gbs
from bench.common import machine_line

#: SmolLM2-135M (hidden 576, 9 heads of 64, 3 kv heads, MLP 1536, vocab 49152): (in, out).
SHAPES = {
    "q/o 576->576": (576, 576),
    "k/v 576->192": (576, 192),
    "gate/up 576->1536": (576, 1536),
    "down 1536->576": (1536, 576),
    "lm_head 576->49152": (576, 49152),
}
#: Copies of a weight together at least this big: past the 32 MiB L3, as a real step's weights are.
COPIES_BYTES = 160 * 2**20
SECONDS = 0.25  # per (path, shape, width)

Maker = Callable[[list[torch.Tensor], int], Callable[[torch.Tensor], None] | None]


def _linear(ws, m):
    return lambda x: [F.linear(x, w) for w in ws]


def _mv(ws, m):
    if m != 1:
        return None
    return lambda x: [torch.mv(w, x[0]) for w in ws]


def _mm_t(ws, m):
    ts = [w.t().contiguous() for w in ws]
    return lambda x: [torch.mm(x, t) for t in ts]


def _mkl_packed(ws, m):
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in ws]
    return lambda x: [torch.ops.mkl._mkl_linear(x, p, w, None, m) for p, w in zip(packed, ws)]


def _onednn(dtype):
    def make(ws, m):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), m) for w in ws]

        def run(x):
            xd = x.to(dtype)
            return [torch.ops.mkldnn._linear_pointwise(xd, p, None, "none", [], "").float() for p in packed]

        return run

    return make


def _mkldnn_module(ws, m):
    from torch.utils import mkldnn as mkldnn_utils

    mods = []
    for w in ws:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w
        mods.append(mkldnn_utils.to_mkldnn(lin))
    return lambda x: [mod(x.to_mkldnn()).to_dense() for mod in mods]


def _bf16(ws, m):
    bs = [w.to(torch.bfloat16) for w in ws]
    return lambda x: [F.linear(x.to(torch.bfloat16), b).float() for b in bs]


class _Copies(nn.Module):
    def __init__(self, ws):
        super().__init__()
        self.lins = nn.ModuleList()
        for w in ws:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = nn.Parameter(w, requires_grad=False)
            self.lins.append(lin)

    def forward(self, x):
        return [lin(x) for lin in self.lins]


def _compiled(ws, m):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    module = _Copies(ws).eval()
    fn = torch.compile(module, dynamic=False)
    return fn


PATHS: dict[str, Maker] = {
    "linear": _linear,
    "mv": _mv,
    "mm_t": _mm_t,
    "mkl_packed": _mkl_packed,
    "onednn_f32": _onednn(torch.float32),
    "onednn_bf16": _onednn(torch.bfloat16),
    "mkldnn_module": _mkldnn_module,
    "bf16": _bf16,
    "compiled": _compiled,
}


def time_path(fn, x, copies: int) -> float:
    """ms per product (best of three rounds over all copies)."""
    with torch.inference_mode():
        fn(x)
        fn(x)
        best = float("inf")
        for _ in range(3):
            rounds, start = 0, time.perf_counter()
            while rounds < 1 or time.perf_counter() - start < SECONDS / 3:
                fn(x)
                rounds += 1
            best = min(best, (time.perf_counter() - start) / (rounds * copies))
    return best * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args()
    torch.manual_seed(0)
    print(machine_line())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"bandwidth (256 MiB fp32 mv): {bandwidth_gbs():.1f} GB/s")
    for shape_name in args.shapes:
        n_in, n_out = SHAPES[shape_name]
        nbytes = n_in * n_out * 4
        copies = max(2, -(-COPIES_BYTES // nbytes))
        ws = [torch.randn(n_out, n_in) * 0.02 for _ in range(copies)]
        print(f"\n{shape_name}: {nbytes / 2**20:.1f} MiB fp32, {copies} copies; ms per product (GB/s of fp32 weight bytes)")
        print(f"{'path':>14} " + " ".join(f"{f'M={m}':>16}" for m in args.rows))
        for name in args.paths:
            cells = []
            for m in args.rows:
                x = torch.randn(m, n_in)
                try:
                    with torch.inference_mode():
                        fn = PATHS[name](ws, m)
                    if fn is None:
                        cells.append("-")
                        continue
                    ref = x @ ws[0].T
                    got = fn(x)[0]
                    got = got.to_dense() if got.is_mkldnn else got
                    tol = 3e-2 if "bf16" in name else 1e-4
                    if not torch.allclose(got.reshape(ref.shape).float(), ref, atol=tol, rtol=tol):
                        cells.append("WRONG")
                        continue
                    ms = time_path(fn, x, copies)
                    cells.append(f"{ms:.3f} ({nbytes / ms / 1e6:.1f})")
                except Exception as exc:  # noqa: BLE001 - a path this build lacks shows as n/a
                    cells.append(f"n/a {type(exc).__name__}")
                finally:
                    torch._dynamo.reset()
            print(f"{name:>14} " + " ".join(f"{c:>16}" for c in cells), flush=True)
        del ws


if __name__ == "__main__":
    main()
