"""A transformers folder loaded straight into quantised modules (``--quantize``), tensor by tensor.

``from_pretrained`` would first build the whole model in ``--dtype`` (ChatGLM3-6B: 12 GiB in
bf16) and only then could it be quantised. Here the model is built with empty (meta) weights
and real buffers (accelerate's ``init_empty_weights``), its linear layers and embedding table
are swapped for quantised ones, and each checkpoint tensor is quantised or copied as it streams
in (:mod:`~glm_api.families.tensor_stream`): the peak is the quantised model plus a block.

This needs the checkpoint's names to be the model's. Mixture-of-experts checkpoints name their
routed experts either fused, as transformers 5 saves them (``mlp.experts.gate_up_proj``), or
one by one, as the published GLM-4.5/4.7/5 checkpoints do (``mlp.experts.7.gate_proj.weight``):
both stream into :class:`~glm_api.families.quantized_experts.QuantizedExperts`, so a 106B MoE never sits
dense in memory. Keys the model itself ignores (``_keys_to_ignore_on_load_unexpected``: the
multi-token-prediction layer of GLM-4.5) are skipped. For checkpoints transformers renames in
other ways (legacy prefixes), :func:`stream_quantized` says why and returns None, and the caller
loads with ``from_pretrained`` and quantises after.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from glm_api.families.quantize import QuantMode, replace_modules
from glm_api.families.quantized_experts import fused_experts
from glm_api.families.tensor_stream import assign, check_all_loaded, iter_checkpoint, weight_files

logger = logging.getLogger(__name__)


def _checkpoint_keys(files: list[Path], indexed: set[str] | None) -> set[str] | None:
    if indexed is not None:
        return indexed
    if all(f.suffix == ".safetensors" for f in files):
        from safetensors import safe_open

        keys: set[str] = set()
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                keys.update(handle.keys())  # the header only
        return keys
    return None  # a lone .bin: its names are known only by reading it


_EXPERT_KEY = re.compile(r"^(?P<experts>.+)\.\d+\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def _model_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """(parameter names, persistent buffer names) a checkpoint of ``model`` holds."""
    params = {name for name, _ in model.named_parameters()}  # a tied output layer is not listed twice
    buffers = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name, value in module._buffers.items()
        if value is not None and name not in module._non_persistent_buffers_set
    }
    return params, buffers


def _as_model_name(key: str, experts: set[str]) -> str:
    """A per-expert checkpoint name as the fused parameter it fills (the name check's view)."""
    match = _EXPERT_KEY.match(key)
    if match and match["experts"] in experts:
        return f"{match['experts']}.{'down_proj' if match['proj'] == 'down_proj' else 'gate_up_proj'}"
    return key


def stream_quantized(path: Path, device: torch.device, dtype: torch.dtype, mode: QuantMode) -> nn.Module | None:
    """The causal LM in ``path`` with its weights quantised as they load, or None (logged) when
    its checkpoint does not name the model's parameters one to one."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with init_empty_weights(include_buffers=False):  # rotary tables and the like are computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    if tied:  # the output layer is the embedding table: one parameter, one checkpoint name
        model.tie_weights()
    files, indexed = weight_files(path)
    keys = _checkpoint_keys(files, indexed)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    experts = {name for name, module in model.named_modules() if fused_experts(module)}
    params, buffers = _model_names(model)
    names = None
    if keys is not None:
        names = {_as_model_name(k, experts) for k in keys if not any(p.search(k) for p in ignored)}
    if names is None or not params <= names <= params | buffers:
        odd = sorted(names ^ params - buffers)[:3] if names is not None else ["(unindexed .bin)"]
        logger.info("%s: checkpoint names differ from the model's (%s): loading whole, quantising after", path, ", ".join(odd))
        return None
    replace_modules(model, mode, device, dtype)
    for file in files:
        for key, tensor, release in iter_checkpoint(file):
            if not any(p.search(key) for p in ignored):
                assign(model, key, tensor, device, dtype, release)
            del tensor
    if tied:  # the table was replaced as it loaded: the output layer follows it
        model.tie_weights()
    check_all_loaded(model, path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model.to(device).eval()
