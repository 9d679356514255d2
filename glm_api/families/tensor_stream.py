"""Reading checkpoint shards tensor by tensor into a model built on the meta device.

Shared by the loaders that stream (ChatGLM3 folders, and transformers folders under
``--quantize``): each tensor is memory-mapped, copied (or quantised) onto its device in row
blocks, and its file pages are given back as soon as it is consumed
(:mod:`~glm_api.families.mapped_pages`), so a load holds the model plus a block, never a shard.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glm_api.families.json_file import read_json
from glm_api.families.mapped_pages import MappedFile
from glm_api.families.quantized_experts import QuantizedExperts
from glm_api.families.quantized_modules import QUANTIZED

_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
_COPY_ROWS = 4096  # rows copied at a time while loading
Release = Callable[[torch.Tensor], None]


def _torch_load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    # Legacy (pre-zip) torch.save format: cannot be memory-mapped, so it is read whole.
    return torch.load(file, map_location="cpu", weights_only=True)


def iter_checkpoint(file: Path) -> Iterator[tuple[str, torch.Tensor, Release]]:
    """(key, tensor, release) for each tensor of one shard. Both formats are memory-mapped: the
    tensors are views of the file (safetensors' ``get_tensor`` too), valid while it is open.
    ``release(view)`` drops the pages under a consumed part of the tensor from this process's
    resident memory, and the whole tensor's go when the caller asks for the next
    (:mod:`~glm_api.families.mapped_pages`): a shard never sits there whole."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                pages = None
                for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    tensor = handle.get_tensor(key)
                    pages = pages or MappedFile(file)  # the file is mapped by now
                    yield key, tensor, pages.release
                    pages.release(tensor)  # the caller has copied it: its pages can go
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise ValueError(f"{file}: cannot read safetensors ({exc})") from exc
        return
    try:
        state = _torch_load(file)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{file}: cannot read checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{file}: not a state dict")  # noqa: TRY004 - the loaders report bad files as ValueError
    pages = MappedFile(file)  # no ranges when the legacy format was read whole
    try:
        while state:
            key, tensor = state.popitem()  # drop our reference as we go
            yield key, tensor, pages.release
            pages.release(tensor)  # the caller has copied it: its pages can go
    finally:
        del state


def assign(
    model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype, release: Release
) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, QuantizedExperts):  # a fused [experts, ...] weight: quantised expert by expert
        module.load_fused(leaf, tensor, device, release)
        return
    if leaf == "weight" and isinstance(module, QUANTIZED):
        if tuple(tensor.shape) != module.weight_shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} does not match {module.weight_shape} from config.json"
            )
        module.load_weight(tensor, device, release)  # quantised as it streams: never whole in memory
        return
    if module._buffers.get(leaf) is not None:  # a persistent buffer (a router's bias): its own dtype
        current = module._buffers[leaf]
        module._buffers[leaf] = _copied(name, tensor, current.shape, current.dtype, device, release)
        return
    current = module._parameters.get(leaf)
    if current is None:
        raise ValueError(f"{name}: not a parameter of {type(model).__name__}")
    target = torch.float32 if _kept_in_float32(model, name, dtype) else dtype
    module._parameters[leaf] = nn.Parameter(_copied(name, tensor, current.shape, target, device, release), requires_grad=False)


def _kept_in_float32(model: nn.Module, name: str, dtype: torch.dtype) -> bool:
    """transformers' rule: ``_keep_in_fp32_modules_strict`` (MoE routers) stay float32 in any
    dtype, ``_keep_in_fp32_modules`` under float16."""
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    return any(part in name for part in keep)


def _copied(
    name: str, tensor: torch.Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device, release: Release
) -> torch.Tensor:
    if tuple(shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not match {tuple(shape)} from config.json")
    # Always a copy: a view would keep the file mapped, and writing over the weights file in
    # place would change the served model under it (measured with safetensors 0.8).
    # Row block by row block, giving back the file's pages behind: a 65024 x 4096 embedding's
    # source never sits in memory whole beside its copy.
    value = torch.empty(tensor.shape, dtype=dtype, device=device)
    if tensor.dim() == 0:
        value.copy_(tensor)
    else:
        for start in range(0, len(tensor), _COPY_ROWS):
            part = tensor[start : start + _COPY_ROWS]
            value[start : start + _COPY_ROWS] = part
            release(part)
    return value


def listing(names: set[str], limit: int = 10) -> str:
    """Up to ``limit`` names, sorted, and how many more: for error messages."""
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def check_all_loaded(model: nn.Module, source: Path) -> None:
    """ValueError naming the tensors of ``model`` no checkpoint tensor filled (still on meta)."""
    left = {name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta}
    if left:
        raise ValueError(f"{source}: tensors left unloaded: {listing(left)}")


def _read_index(path: Path) -> dict[str, Any]:
    index = read_json(path, "weight index")
    if not isinstance(index, dict):
        raise ValueError(f"{path}: weight index is not a JSON object")  # noqa: TRY004 - a bad file, as ValueError
    return index


def weight_files(folder: Path) -> tuple[list[Path], set[str] | None]:
    """Shard files in load order, and the checkpoint's key set when an index lists it.
    Safetensors are preferred when a folder holds both formats."""
    for index_name, single_name in _WEIGHT_LAYOUTS:
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = _read_index(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path}: no 'weight_map'")
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ValueError(f"{index_path}: shard files missing: {', '.join(absent)}")
            return files, set(weight_map)
        if (folder / single_name).is_file():
            return [folder / single_name], None
    names = ", ".join(name for layout in _WEIGHT_LAYOUTS for name in layout)
    raise ValueError(f"{folder}: no weights found (expected one of {names})")
