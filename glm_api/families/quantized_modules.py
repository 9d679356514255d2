"""The quantised stand-ins for ``nn.Linear`` and ``nn.Embedding`` (:mod:`quantize` decides
where they go): int8 weights (:class:`Int8Linear`, optionally int8 activations), int4 weights
(:class:`Int4Linear`) and int8 embedding rows (:class:`Int8Embedding`), each filled by
``load_weight`` from a dense weight, block by block.

Kernels are picked by the rows a call carries, from measurements on the 2-core dev CPU at
ChatGLM3's MLP shape, 4096 -> 27392 (``python bench/bench_quantize.py --kernels-only``):

- ``int8``, weight-only: ``_weight_int8pack_mm`` reads the weight once per row (bf16
  activations 3.5 ms for 1 row, 7.6 for 8, 29 for 32; dense bf16 7.2 / 7.9 / 13); past
  ``DEQUANT_ROWS`` (prompt chunks) the weight is dequantised once for the call (~120 ms,
  then a dense matmul). Only the weights are rounded, so the model's answers stay those of
  the full-precision model (SmolLM2 over 700 tokens of text: perplexity 41.166 against
  41.174, top-1 agreement 0.967).
- ``w8a8``: each activation row is rounded to int8 too (its own scale) and ``_int_mm``
  multiplies: 2 ms for 1 row, ~10-14 ms from 2 to 32 rows and 143 at 512 (bf16 dense 125),
  so batched decoding and prompts run at bf16 speed on half the memory, at a measured cost in
  accuracy (same text: perplexity 42.1, top-1 agreement 0.867). The int32 sums are exact, so
  a row's product does not depend on its neighbours; but rounding activations makes a small
  difference elsewhere (a bf16 attention over another batch) cross a step more easily.
- ``int4``: asymmetric per group of 128 inputs (or the largest of 64/32 that divides the
  input size), weight-only, tinygemm. It is for memory (~4x smaller than bf16), not speed past
  a few rows (21 ms at 32 rows); accuracy drops more (SmolLM2: perplexity 60.8). On CPU the
  kernel reads the weight again for every row, so past ``dequant_rows`` (timed at start-up)
  the weight is dequantised for the call from the packed codes (:mod:`int4_cpu`): a 512-row
  prompt chunk at SmolLM2's 576 -> 1536 shape 402 ms -> 7.4 ms.

Each row is computed on its own in every kernel, so a row's result does not depend on the values
of the rows beside it; int8 and int4 calls of different widths may differ by float rounding, as
dense batched matmuls already do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from glm_api.families.int4_cpu import dequantized_mm

Release = Callable[[torch.Tensor], None]

#: int8: past this many rows (prompt chunks) dequantising once beats _weight_int8pack_mm, whose
#: cost grows ~1 ms a row at ChatGLM3's MLP shape (measured crossover ~200).
DEQUANT_ROWS = 192
_INT4_GROUPS = (128, 64, 32)
# Weight elements quantised together while loading: a 64 MB float32 block is the only copy.
_LOAD_ELEMENTS = 1 << 24


def _block_rows(columns: int) -> int:
    """Rows of a weight quantised at a time: a multiple of 16 (int4 packs 16-row tiles)."""
    return max(16, _LOAD_ELEMENTS // columns // 16 * 16)


@torch.no_grad()
def _int8_rows(
    weight: torch.Tensor, device: torch.device, release: Release | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales (max / 127) of each row of a float ``weight``, on ``device``,
    in row blocks: one float32 block is the only temporary."""
    rows, columns = weight.shape
    qweight = torch.empty(rows, columns, dtype=torch.int8, device=device)
    scale = torch.empty(rows, dtype=torch.float32, device=device)
    step = _block_rows(columns)
    for start in range(0, rows, step):
        block = weight[start : start + step].to(device=device, dtype=torch.float32, copy=True)
        block_scale = torch.linalg.vector_norm(block, ord=float("inf"), dim=1).clamp(min=1e-12) / 127
        qweight[start : start + step] = block.div_(block_scale[:, None]).round_().clamp_(-127, 127)  # in place
        scale[start : start + step] = block_scale
        if release is not None:
            release(weight[start : start + step])
    return qweight, scale


def _narrow_dtype(compute: torch.dtype) -> torch.dtype:
    # _weight_int8pack_mm with float32 activations ran 10x slower than with bfloat16 here.
    return torch.bfloat16 if compute == torch.float32 else compute

class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 per output channel (symmetric, scale = max/127)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, device: torch.device, dtype: torch.dtype,
        int8_activations: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.int8_activations = int8_activations  # w8a8: activations rounded to int8 too
        # Widest call _weight_int8pack_mm takes; wider ones dequantise. Measured per machine and
        # shape at start-up (glm_api/families/quant_kernels.py); DEQUANT_ROWS until then.
        self.dequant_rows = DEQUANT_ROWS
        self.target_device = device  # placeholders live on meta until load_weight fills them there
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device="meta"))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device="meta"))
        self.register_buffer("narrow_scale", torch.empty(out_features, dtype=_narrow_dtype(dtype), device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False) if bias else None

    @torch.no_grad()
    def load_weight(
        self, weight: torch.Tensor, device: torch.device | None = None, release: Release | None = None
    ) -> None:
        """Quantise a float ``[out, in]`` weight into this module on ``device`` (default: the one
        it was made for), in row blocks: bounded memory. ``release`` is called with each block
        of ``weight`` once consumed (a memory-mapped checkpoint gives its pages back)."""
        device = self.target_device = device or self.target_device
        self.qweight, self.scale = _int8_rows(weight, device, release)
        self.narrow_scale = self.scale.to(self.narrow_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        if self.int8_activations:
            out = self._int8_activations(rows)
        elif count <= self.dequant_rows and has_kernel("_weight_int8pack_mm", rows.device.type):
            out = self.int8pack(rows)
        else:
            out = self.dequantized(rows)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def int8pack(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ W^T`` by ``_weight_int8pack_mm`` (reads the int8 weight once per row)."""
        narrow = self.narrow_scale.dtype
        return torch._weight_int8pack_mm(rows.to(narrow), self.qweight, self.narrow_scale).to(rows.dtype)

    def dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ W^T`` with the weight dequantised once for the call (wins for wide calls)."""
        weight = self.qweight.to(rows.dtype) * self.scale[:, None].to(rows.dtype)
        return torch.nn.functional.linear(rows, weight)

    def _int8_activations(self, rows: torch.Tensor) -> torch.Tensor:
        """int8 x int8 on activations quantised per row (each row its own scale)."""
        count = rows.shape[0]
        if rows.device.type == "cuda" and count <= 16:  # cuBLASLt's int8 GEMM wants more than 16 rows
            rows = torch.nn.functional.pad(rows, (0, 0, 0, 17 - count))
        x = rows.float()
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.qweight.t())
        return (acc.float() * x_scale * self.scale)[:count].to(rows.dtype)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def extra_repr(self) -> str:
        kind = "w8a8" if self.int8_activations else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


@functools.cache  # a property of the torch build: asked once per op and device type, not per call
def has_kernel(op: str, device_type: str) -> bool:
    key = "CUDA" if device_type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)


def int4_group_size(in_features: int) -> int | None:
    return next((g for g in _INT4_GROUPS if in_features % g == 0), None)


def int4_packable(in_features: int, out_features: int) -> bool:
    """Whether tinygemm can pack a weight of this shape (inputs in groups, 16-row tiles)."""
    return int4_group_size(in_features) is not None and out_features % 16 == 0


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with W as 4-bit codes per group of inputs: ``w = (q - 8) * scale + zero``,
    tinygemm's convention, packed for the device's kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device, dtype: torch.dtype):
        super().__init__()
        if not int4_packable(in_features, out_features):
            raise ValueError(f"int4 needs in_features divisible by 32 and out_features by 16, got {in_features}x{out_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, int4_group_size(in_features)
        # tinygemm on CUDA takes bf16 only; on CPU float32 activations are exact and as fast.
        self.act_dtype = torch.bfloat16 if device.type == "cuda" else dtype
        self.target_device = device
        # CPU: wider calls dequantise (int4_cpu), once start-up timing has checked that path and
        # found where it wins (glm_api/families/quant_kernels.py); None: the kernel at every width.
        self.dequant_rows: int | None = None
        self.register_buffer("packed", None)
        self.register_buffer("scales_and_zeros", torch.empty(in_features // self.group_size, out_features, 2, dtype=self.act_dtype, device="meta"))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False) if bias else None

    @torch.no_grad()
    def load_weight(
        self, weight: torch.Tensor, device: torch.device | None = None, release: Release | None = None
    ) -> None:
        """As :meth:`Int8Linear.load_weight`."""
        device, g = device or self.target_device, self.group_size
        if device.type != self.target_device.type:
            raise ValueError(f"int4 weights packed for {self.target_device.type} cannot load on {device.type}")
        sz = torch.empty(self.out_features, self.in_features // g, 2, dtype=torch.float32, device=device)
        codes, packed = [], []
        step = _block_rows(self.in_features)
        for start in range(0, self.out_features, step):
            block = weight[start : start + step].to(device=device, dtype=torch.float32, copy=True)
            groups = block.reshape(block.shape[0], -1, g)
            low, high = groups.amin(dim=-1), groups.amax(dim=-1)
            scale = ((high - low) / 15).clamp(min=1e-12)
            q = groups.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).reshape(block.shape).to(torch.int32)
            sz[start : start + step, :, 0] = scale
            sz[start : start + step, :, 1] = low + 8 * scale
            if release is not None:
                release(weight[start : start + step])
            if device.type == "cuda":
                codes.append(q)
            else:  # the CPU packing is row-local (checked in the tests): pack block by block,
                packed.append(torch._convert_weight_to_int4pack_for_cpu(q, 1))  # int32 codes stay small
        self.scales_and_zeros = sz.transpose(0, 1).contiguous().to(self.act_dtype)
        if device.type == "cuda":  # two codes a byte, high nibble first, as tinygemm packs them
            whole = torch.cat(codes)
            tiles = 8 if self.in_features % 128 == 0 else 4 if self.in_features % 64 == 0 else 2  # K % (tiles * 16)
            self.packed = torch._convert_weight_to_int4pack((whole[:, ::2] << 4 | whole[:, 1::2]).to(torch.uint8), tiles)
        else:
            self.packed = torch.cat(packed) if len(packed) > 1 else packed[0]

    def int4pack(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ W^T`` by tinygemm's kernel (on CPU it reads the packed weight once per row);
        ``rows`` in ``act_dtype``."""
        if rows.device.type == "cuda":
            return torch._weight_int4pack_mm(rows, self.packed, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)

    def dequantized(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ W^T`` (CPU) with the weight dequantised for the call from the packed codes."""
        return dequantized_mm(rows, self.packed, self.scales_and_zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.act_dtype)
        if self.dequant_rows is not None and rows.shape[0] > self.dequant_rows and rows.device.type == "cpu":
            out = self.dequantized(rows).to(x.dtype)
        else:
            out = self.int4pack(rows).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows (one scale each); a lookup dequantises the rows it
    reads. Measured on SmolLM2 (700 tokens): top-1 agreement 0.996, perplexity 41.185 against
    41.174, for half the table's bf16 memory (ChatGLM3-6B: 266 MB saved)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.target_device = device
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device="meta"))
        self.register_buffer("scale", torch.empty(num_embeddings, 1, dtype=dtype, device="meta"))

    @torch.no_grad()
    def load_weight(
        self, weight: torch.Tensor, device: torch.device | None = None, release: Release | None = None
    ) -> None:
        self.qweight, scale = _int8_rows(weight, device or self.target_device, release)
        self.scale = scale[:, None].to(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.dtype) * self.scale[ids]

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


QUANTIZED = (Int8Linear, Int4Linear, Int8Embedding)


def quantized_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers(recurse=False) if t is not None)
