"""Weight quantisation of chat models (``--quantize int8|w8a8|int4``) on torch's own kernels.

The decoder layers' linear projections are replaced by modules that hold int8 or int4
weights, and the embedding table by int8 rows; the output layer stays in the compute dtype
except under int4 (see :func:`_quantized_twin` for what each choice was measured to cost). The
matmuls are torch's kernels, none hand-written: ``_weight_int8pack_mm`` (int8 weights,
16-bit activations), ``_int_mm`` (int8 x int8 -> int32) and tinygemm's ``_weight_int4pack_mm``.
torchao wraps the same ops, but its eager int8 path dequantises the whole weight on every call
(SmolLM2 ran at 0.45x fp32), and computing a scale needs no dependency.

The modules themselves (and what each kernel was measured to cost) are in :mod:`quantized_modules`,
the mixture-of-experts layers in :mod:`quantized_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from glm_api.families.quantized_experts import QuantizedExperts, fused_experts
from glm_api.families.quantized_modules import (
    QUANTIZED,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    has_kernel,
    int4_packable,
    quantized_bytes,
)
from glm_api.units import byte_size

QuantMode = Literal["none", "int8", "w8a8", "int4"]
QUANT_MODES: tuple[str, ...] = ("none", "int8", "w8a8", "int4")
#: Names of output layers (kept dense, or int8 under int4: see _quantized_twin).
_OUTPUT_LAYERS = ("lm_head", "output_layer", "embed_out")


def check_supported(mode: str, device: torch.device) -> None:
    """ValueError saying why ``mode`` cannot run on ``device`` (checked before loading)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize {mode!r} is not one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--quantize {mode} runs on cpu or cuda devices, not {device.type}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if mode == "int4" and major < 8:
            raise ValueError(
                f"--quantize int4 needs a GPU of compute capability 8.0 or newer (tinygemm's int4 kernel); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --quantize int8"
            )
    # int8 without _weight_int8pack_mm on the device still runs, dequantising per call (slow).
    op = {"int8": "mm", "w8a8": "_int_mm", "int4": "_weight_int4pack_mm"}[mode]
    if device.type == "cpu" and mode == "int4":
        op = "_weight_int4pack_mm_for_cpu"
    if not has_kernel(op, device.type):
        raise ValueError(f"--quantize {mode}: this torch build ({torch.__version__}) has no {device.type} kernel for {op}")


def _quantized_twin(name: str, module: nn.Module, mode: str, tied: set[int], device: torch.device, dtype: torch.dtype):
    """The empty quantised module that replaces ``module``, or None where it stays as it is.

    Decoder projections take ``mode``. Embeddings go to int8 rows (measured lossless) unless
    tied to the output layer. The output layer stays dense for int8 and w8a8 (int8 there cut
    SmolLM2's top-1 agreement from 0.967 to 0.940) and goes to int8 for int4, where that costs
    next to nothing beside int4 itself (0.649 -> 0.639) and saves a quarter of what is left."""
    if isinstance(module, nn.Embedding):
        if id(module.weight) in tied:
            return None
        return Int8Embedding(module.num_embeddings, module.embedding_dim, device, dtype)
    if not isinstance(module, nn.Linear):
        return None
    bias = module.bias is not None
    if any(part in _OUTPUT_LAYERS for part in name.split(".")):
        if mode != "int4" or id(module.weight) in tied:
            return None
        return Int8Linear(module.in_features, module.out_features, bias, device, dtype)
    if mode == "int4":
        if not int4_packable(module.in_features, module.out_features):
            return None  # stays dense (no such shape in the supported families)
        return Int4Linear(module.in_features, module.out_features, bias, device, dtype)
    return Int8Linear(module.in_features, module.out_features, bias, device, dtype, int8_activations=mode == "w8a8")


def kept_in_float32(model: nn.Module) -> tuple[str, ...]:
    """Names (parts) of modules the model keeps in float32: they stay dense (GLM-5's indexer reads
    its ``weights_proj.weight.dtype``)."""
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return tuple(sorted(names | set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())))


def _twins(model: nn.Module, mode: str, device_of, dtype: torch.dtype) -> list[tuple[str, nn.Module, nn.Module]]:
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tied = linear_weights & embedding_weights
    keep = kept_in_float32(model)
    found = []
    for name, module in list(model.named_modules()):
        if fused_experts(module):
            num, two_i, hidden = module.gate_up_proj.shape
            twin = QuantizedExperts(num, hidden, two_i // 2, module.act_fn, mode, device_of(module), dtype)
            found.append((name, module, twin))
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding)) or any(k in name for k in keep):
            continue
        twin = _quantized_twin(name, module, mode, tied, device_of(module), dtype)
        if twin is not None:
            found.append((name, module, twin))
    return found


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def replace_modules(model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Swap the modules ``mode`` quantises for empty quantised ones that ``load_weight`` fills
    on ``device``; returns their names. For a meta-device model, before its weights stream in."""
    found = _twins(model, mode, lambda _: device, dtype)
    for name, _, twin in found:
        _swap(model, name, twin)
    return [name for name, _, _ in found]


def quantize_model(model: nn.Module, mode: str) -> QuantReport:
    """Quantise a loaded model in place, module by module (each dense weight is freed as its
    quantised twin is made: the peak is the dense model, not twice it)."""
    dtype = next(model.parameters()).dtype
    for name, module, twin in _twins(model, mode, lambda m: next(m.parameters()).device, dtype):
        if isinstance(twin, QuantizedExperts):
            twin.load_fused("gate_up_proj", module.gate_up_proj)
            twin.load_fused("down_proj", module.down_proj)
            _swap(model, name, twin)
            continue
        twin.load_weight(module.weight)
        if getattr(module, "bias", None) is not None:
            twin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        _swap(model, name, twin)
    return report(model, mode, dtype)


@dataclass(frozen=True)
class QuantReport:
    mode: str
    modules: int
    dense_bytes: int  # what the quantised modules' weights take in the compute dtype
    quantized_bytes: int

    def line(self) -> str:
        return (
            f"quantised {self.modules} modules ({self.mode}): {byte_size(self.dense_bytes)} -> "
            f"{byte_size(self.quantized_bytes)} of weights (saved {byte_size(self.dense_bytes - self.quantized_bytes)})"
        )


def report(model: nn.Module, mode: str, dtype: torch.dtype) -> QuantReport:
    """What the quantised modules of ``model`` hold against the same weights in ``dtype``."""
    mods = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    elements = sum(m.weight_shape[0] * m.weight_shape[1] for m in mods)
    dense = elements * torch.tensor([], dtype=dtype).element_size()
    return QuantReport(mode, len(mods), dense, sum(quantized_bytes(m) for m in mods))
