"""int4 weights on CPU dequantised for wide calls (prompt chunks, many streams).

torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) reads the whole packed weight again
for every row: measured on the 2-core dev CPU (AMD EPYC VM) at SmolLM2's 576 -> 1536 shape,
0.8 ms at 1 row, 6.5 at 8, 26 at 32 and 402 ms at 512 rows, so a 512-token prompt chunk of
SmolLM2 took over a minute. Dequantising the weight once for the call and multiplying densely
took 7.4 ms at 512 rows (``/work/scratch/i4d.py``). The codes are read back from torch's own
packing (no second copy of the weight is kept):

- output rows in blocks of 64: a block's bytes are ``[in, 32]``, byte ``j`` holding row ``j``'s
  code in its low nibble and row ``j + 32``'s in its high one;
- the last ``out % 64`` rows: ``[in, rows / 2]``, byte ``j`` holding rows ``2j`` (low) and
  ``2j + 1`` (high).

That layout is torch's, not a documented format: :func:`unpacks_as_packed` checks it against
the kernel before a model uses it (``quant_kernels.choose_kernels``), and a torch that packs
otherwise keeps the int4 kernel at every width.
"""

from __future__ import annotations

import torch

#: Rows per block of the CPU packing.
BLOCK = 64
#: A wide call dequantises at most this many bytes of weight at a time.
CHUNK_BYTES = 64 * 2**20


def codes_t(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The 4-bit codes (0..15, uint8) of ``packed``'s rows, as ``[in, out]``; ``packed`` is a
    row range of a CPU int4 packing that starts on a block boundary."""
    out = packed.shape[0]
    full = out // BLOCK * BLOCK
    pieces = []
    if full:
        blocks = packed[:full].reshape(full // BLOCK, in_features, BLOCK // 2)
        codes = torch.cat((blocks & 15, blocks >> 4), dim=-1)  # [blocks, in, 64]
        pieces.append(codes.permute(1, 0, 2).reshape(in_features, full))
    if out > full:
        tail = packed[full:].reshape(in_features, (out - full) // 2)
        pieces.append(torch.stack((tail & 15, tail >> 4), dim=-1).reshape(in_features, out - full))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def weight_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, start: int, end: int) -> torch.Tensor:
    """Output columns ``start..end`` of ``W^T`` (``[in, end - start]``, in the scales' dtype):
    ``w = (q - 8) * scale + zero`` per group of ``group`` inputs, tinygemm's convention.
    ``start`` is a multiple of :data:`BLOCK`."""
    sz = scales_and_zeros[:, start:end]  # [in / group, n, 2]
    scale, zero = sz[..., 0].unsqueeze(1), sz[..., 1].unsqueeze(1)
    in_features = sz.shape[0] * group
    q = codes_t(packed[start:end], in_features).view(sz.shape[0], group, end - start)
    return torch.addcmul(zero - 8 * scale, q.to(scale.dtype), scale).view(in_features, end - start)


def dequantized_mm(
    rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int
) -> torch.Tensor:
    """``rows @ W^T`` with the weight dequantised for this call, a chunk of output columns at a
    time (at most :data:`CHUNK_BYTES` of dense weight alive at once)."""
    out_features, in_features = packed.shape[0], rows.shape[1]
    step = max(BLOCK, CHUNK_BYTES // (in_features * scales_and_zeros.element_size()) // BLOCK * BLOCK)
    if step >= out_features:
        return rows @ weight_t(packed, scales_and_zeros, group, 0, out_features)
    out = rows.new_empty((rows.shape[0], out_features))
    for start in range(0, out_features, step):
        end = min(out_features, start + step)
        out[:, start:end] = rows @ weight_t(packed, scales_and_zeros, group, start, end)
    return out


def unpacks_as_packed(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> bool:
    """Whether :func:`dequantized_mm` gives what the int4 kernel gives for these weights (this
    torch packs the layout this module reads)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, packed.shape[1] * 2, generator=generator).to(scales_and_zeros.dtype)
    expected = torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros).float()
    got = dequantized_mm(x, packed, scales_and_zeros, group).float()
    tolerance = 1e-4 if x.dtype == torch.float32 else 2e-2  # of the largest output: rounding, not a wrong code
    scale = expected.abs().max().clamp(min=1e-6)
    return got.shape == expected.shape and bool((got - expected).abs().max() <= tolerance * scale)
