"""A peft LoRA adapter folder read and fitted onto the loaded chat model's modules.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``), as
``PeftModel.save_pretrained`` writes them; peft's own helpers read both (``LoraConfig.
from_pretrained``, ``load_peft_weights``), after this module checked that the files are there, so
nothing is ever looked up on a model hub. Each ``...<module>.lora_A.weight`` ``[r, in]`` /
``lora_B.weight`` ``[out, r]`` pair becomes a :class:`LoraDelta` on a module of the loaded model:

- transformers families: the adapter's module names are the model's (``model.layers.N.self_attn.
  q_proj``, ``mlp.gate_proj``...);
- ChatGLM3 (and GLM-4 remote-code) adapters name THUDM's modules, which the loader maps onto
  ``GlmForCausalLM`` (DESIGN.md "Model facts", :mod:`glm_api.families.chatglm3.checkpoint`):
  ``self_attention.dense`` -> ``self_attn.o_proj``, ``mlp.dense_h_to_4h`` -> ``mlp.gate_up_proj``
  (the same fused layout), ``mlp.dense_4h_to_h`` -> ``mlp.down_proj``, and the fused
  ``self_attention.query_key_value`` -> ``q_proj``, ``k_proj``, ``v_proj``: each takes the
  adapter's A whole and its rows of B (all q heads, then the k groups, then the v groups), since
  ``B A x`` split by rows is exactly the three projections' deltas.

Anything that does not fit is an :class:`~glm_api.errors.AdapterError` that names the file and
what is wrong: a missing file, a module the model does not have, a rank that disagrees with the
config, shapes of another architecture, or a peft feature that is not a plain LoRA delta (DoRA,
trained biases, whole modules saved beside the adapter).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glm_api.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
# THUDM's per-layer module names -> GlmForCausalLM's (as glm_api/families/chatglm3/checkpoint.py
# renames the weights); the fused qkv becomes three modules.
_CHATGLM_LAYER = re.compile(r"(?:transformer\.)?encoder\.layers\.(\d+)\.(.+)")
_CHATGLM_RENAMES = {
    "self_attention.dense": ("self_attn.o_proj",),
    "mlp.dense_h_to_4h": ("mlp.gate_up_proj",),
    "mlp.dense_4h_to_h": ("mlp.down_proj",),
    "self_attention.query_key_value": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
}


@dataclass(frozen=True)
class LoraDelta:
    """``delta(x) = scale * B (A x)`` on one module of the model: A ``[r, in]``, B ``[out, r]``."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraWeights:
    """An adapter fitted onto one loaded model: module name -> its delta."""

    name: str
    path: Path
    deltas: dict[str, LoraDelta]
    base_model: str | None  # the config's base_model_name_or_path, for messages

    @property
    def max_rank(self) -> int:
        return max(d.rank for d in self.deltas.values())


def check_adapter_folder(path: Path) -> Path:
    """The weight file of an adapter folder; AdapterError when the folder or a file is missing
    (cheap: the settings are checked with it before any model loads)."""
    if not path.is_dir():
        raise AdapterError(f"LoRA adapter {str(path)!r} is not a folder (a peft adapter folder holds {CONFIG_FILE} and {WEIGHT_FILES[0]})")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"LoRA adapter {str(path)!r} has no {CONFIG_FILE}: not a peft adapter folder")
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise AdapterError(f"LoRA adapter {str(path)!r} has no weight file ({' or '.join(WEIGHT_FILES)})")


def read_lora(name: str, path: str | Path, model: nn.Module) -> LoraWeights:
    """The adapter at ``path`` fitted onto ``model``'s modules, in the model's dtype and on each
    module's device; AdapterError for anything that does not fit (see the module docstring)."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    folder = Path(path)
    weight_file = check_adapter_folder(folder)
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, OSError) as exc:  # not JSON, not a LoRA config, unknown fields
        raise AdapterError(f"{folder / CONFIG_FILE}: not a LoRA adapter config: {exc}") from None
    _check_plain_lora(folder, config)
    try:
        state = load_peft_weights(str(folder), device="cpu")
    except Exception as exc:  # safetensors/torch raise their own types for a corrupt file
        raise AdapterError(f"{weight_file}: cannot read the adapter weights: {exc}") from None
    pairs = _pairs(weight_file, state)
    base = config.base_model_name_or_path
    trained_on = f" (it was trained on {base!r})" if base else ""
    modules = dict(model.named_modules())
    absent = sorted(p for p in pairs if _targets(p, modules) is None)
    if absent:
        shown = ", ".join(absent[:4]) + (f" and {len(absent) - 4} more" if len(absent) > 4 else "")
        raise AdapterError(
            f"LoRA adapter {name!r} ({folder}) targets modules this chat model does not have: {shown}{trained_on}; "
            "an adapter must be trained on the model it is served with"
        )
    dtype = next(model.parameters()).dtype
    deltas: dict[str, LoraDelta] = {}
    for module_path, (a, b) in sorted(pairs.items()):
        rank = _configured(config.rank_pattern, module_path, config.r)
        if a.shape[0] != rank or b.shape[1] != a.shape[0]:
            raise AdapterError(
                f"{weight_file}: {module_path} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                f"but {CONFIG_FILE} says rank {rank}: the weights and the config are of different adapters"
            )
        alpha = _configured(config.alpha_pattern, module_path, config.lora_alpha)
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        targets = _targets(module_path, modules)
        outs = [modules[t].out_features for t in targets]
        ins = {modules[t].in_features for t in targets}
        if a.shape[1] not in ins or len(ins) != 1 or b.shape[0] != sum(outs):
            raise AdapterError(
                f"LoRA adapter {name!r} ({folder}) does not fit the chat model{trained_on}: {module_path} maps "
                f"{a.shape[1]} -> {b.shape[0]} features, the model's {' + '.join(targets)} maps "
                f"{next(iter(ins))} -> {' + '.join(map(str, outs))}; an adapter for another architecture or size"
            )
        for target, b_rows in zip(targets, b.split(outs, dim=0)):
            device = _device_of(modules[target])
            deltas[target] = LoraDelta(
                a.to(device=device, dtype=dtype).contiguous(), b_rows.to(device=device, dtype=dtype).contiguous(), scale
            )
    if not deltas:
        raise AdapterError(f"{weight_file}: no LoRA weights (lora_A / lora_B) in it")
    return LoraWeights(name, folder, deltas, base)


def _check_plain_lora(folder: Path, config: Any) -> None:
    """Refuse what is not ``W + scale * B A`` on linear layers: served otherwise, the answers
    would silently differ from the fine-tuned model's."""
    path = folder / CONFIG_FILE
    unsupported = [
        (str(config.peft_type) not in ("LORA", "PeftType.LORA"), f"peft_type {config.peft_type} (only LORA)"),
        (bool(config.use_dora), "use_dora (DoRA rescales the base weights)"),
        (config.bias != "none", f"bias {config.bias!r} (trained biases)"),
        (bool(getattr(config, "lora_bias", False)), "lora_bias"),
        (bool(config.modules_to_save), f"modules_to_save {config.modules_to_save} (whole modules replaced)"),
        (bool(getattr(config, "trainable_token_indices", None)), "trainable_token_indices"),
        (bool(getattr(config, "target_parameters", None)), "target_parameters"),
        (bool(getattr(config, "alora_invocation_tokens", None)), "alora_invocation_tokens (activated LoRA)"),
        (bool(getattr(config, "layer_replication", None)), "layer_replication"),
    ]
    refused = [what for bad, what in unsupported if bad]
    if refused:
        raise AdapterError(f"{path}: not supported: {', '.join(refused)}; only plain LoRA on linear layers is served")


def _pairs(weight_file: Path, state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name (the model's own, peft's wrapper prefix removed) -> (A, B)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, tensor in state.items():
        match = _LORA_KEY.fullmatch(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            other.append(key)
            continue
        found.setdefault(match.group(1), {})[match.group(2)] = tensor
    if other:
        shown = ", ".join(sorted(other)[:4])
        raise AdapterError(f"{weight_file}: weights that are not lora_A / lora_B of a linear layer: {shown}")
    pairs = {}
    for module_path, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weight_file}: {module_path} has lora_{next(iter(ab))} without its other half")
        if ab["A"].dim() != 2 or ab["B"].dim() != 2:
            raise AdapterError(f"{weight_file}: {module_path}: lora_A / lora_B must be matrices (a linear layer's)")
        pairs[module_path] = (ab["A"].float(), ab["B"].float())
    return pairs


def _targets(module_path: str, modules: dict[str, nn.Module]) -> tuple[str, ...] | None:
    """The model's linear modules an adapter's module name applies to; None when there are none."""
    names: tuple[str, ...] = (module_path,)
    match = _CHATGLM_LAYER.fullmatch(module_path)
    if module_path not in modules and match is not None and match.group(2) in _CHATGLM_RENAMES:
        names = tuple(f"model.layers.{match.group(1)}.{leaf}" for leaf in _CHATGLM_RENAMES[match.group(2)])
    if all(_is_linear(modules.get(n)) for n in names):
        return names
    return None


def _is_linear(module: nn.Module | None) -> bool:
    # nn.Linear and the quantised linear layers of glm_api/families/quantized_modules.py
    return module is not None and isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def _configured(pattern: dict[str, Any] | None, module_path: str, default: Any) -> Any:
    """A per-module override (peft's rank_pattern / alpha_pattern, matched as peft matches it)."""
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    key = get_pattern_key(list(pattern), module_path)
    return pattern.get(key, default)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
