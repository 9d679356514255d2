"""Turning the configured device and dtype strings into torch objects.

``--device`` names one device or a comma-separated list: one chat replica per entry
(``cuda:0,cuda:1``; ``all`` for every visible GPU; ``cpu,cpu`` for two CPU replicas), or with
``--device-map`` one chat model split by layers over them (:mod:`glm_api.device_map`).
"""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first GPU when there is one; ``cuda:N`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_devices(spec: str) -> list[torch.device]:
    """The devices of ``--device``, one chat replica each, in order; the first also holds the
    embedding models unless ``--embedding-device`` says otherwise.

    ``all`` is every visible GPU (an error without one: say ``cpu`` to mean the CPU). A GPU may
    be listed once: each replica sizes its KV cache from the memory its device has left.
    """
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ValueError(f"device {spec!r} names no device")
    if names == ["all"]:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device 'all' asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
        return [torch.device("cuda", i) for i in range(count)]
    if "all" in names:
        raise ValueError(f"device {spec!r}: 'all' stands alone, it already lists every GPU")
    devices = []
    for name in names:
        try:
            devices.append(resolve_device(name))
        except RuntimeError:  # torch.device's own complaint lists every backend it was built with
            raise ValueError(f"device {name!r} is not one of auto, all, cpu, cuda, cuda:N") from None
    gpus = [_gpu_index(d) for d in devices if d.type == "cuda"]
    twice = sorted({i for i in gpus if gpus.count(i) > 1})
    if twice:
        raise ValueError(
            f"device {spec!r} lists cuda:{twice[0]} more than once; each replica sizes its KV cache from the "
            "memory its GPU has left, so list each GPU once"
        )
    return devices


def _gpu_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: half precision on a GPU (bf16 where supported), float32 on CPU.

    On CPU float32 wins as soon as requests are batched: without native bf16 units, batched
    bf16 matmuls ran ~3x slower here than fp32 (see DESIGN.md, "Models").
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}") from None
