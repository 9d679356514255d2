"""Which family loads a chat model path, and loading it with that family.

Only local paths are read: nothing is ever downloaded, so a missing path is an error that
says where to put the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from glm_api.families.base import LoadedChatModel
from glm_api.families.quantize import QuantMode
from glm_api.families.quantize import check_supported as check_quantize_supported
from glm_api.families.quantize import report as quantization_report
from glm_api.families.transformers_lm import check_causal_lm_config, load_gguf, load_transformers_lm, read_config
from glm_api.families.weight_layout import store_linear_weights_input_major

if TYPE_CHECKING:
    from glm_api.device_map import LayerSplit

logger = logging.getLogger(__name__)

_HOW_TO_FIX = "put the weights in ./model/<name> or point GLM_API_CHAT_MODEL at a model folder or .gguf file"
_CHATGLM_MODULE = "glm_api.families.chatglm3"


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only .gguf in a folder."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{path} holds several GGUF files ({names}): point GLM_API_CHAT_MODEL at one of them")
    return found[0] if found else None


def _config_says_chatglm(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    config = read_config(path)
    return config.get("model_type") == "chatglm" or "ChatGLMModel" in (config.get("architectures") or [])


def _is_chatglm3(path: Path) -> bool:
    # Imported here: the chatglm3 family is optional and may import heavier code.
    try:
        from glm_api.families.chatglm3 import is_chatglm3_folder
    except ImportError as exc:
        if exc.name != _CHATGLM_MODULE:
            raise  # the module exists but something it imports is missing: a real error
        # The module (or its is_chatglm3_folder) is not there yet: judge by config.json alone.
        return _config_says_chatglm(path)
    return bool(is_chatglm3_folder(path))


def detect_chat_family(path: Path, trust_remote_code: bool = False) -> str:
    """The family of a chat model path: "chatglm3", "gguf" or "transformers"; ValueError says why not."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"chat model path {path} does not exist (nothing is downloaded): {_HOW_TO_FIX}")
    gguf = _gguf_file(path)
    if gguf is not None:
        return "gguf"
    if path.is_file():
        raise ValueError(f"{path} is a file but not a .gguf model: {_HOW_TO_FIX}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} holds neither a config.json nor a .gguf file, so it is no model: {_HOW_TO_FIX}")
    if _is_chatglm3(path):
        return "chatglm3"
    check_causal_lm_config(path, read_config(path), trust_remote_code)
    return "transformers"


def load_chat_model(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path,
    trust_remote_code: bool = False,
    quantize: QuantMode = "none",
    split: LayerSplit | None = None,
) -> LoadedChatModel:
    """Load the chat model at ``path`` with the family :func:`detect_chat_family` picks.

    ``split`` spreads its layers over several devices (``--device-map``; ``device`` is then the
    first of them): ChatGLM3 and transformers folders load each tensor on its layer's device; a
    GGUF model is dequantised on the CPU first, then moved.

    ``quantize`` (int8, w8a8, int4) loads the weights into quantised modules, each tensor
    quantised as it streams in (:mod:`glm_api.families.quantize`, :mod:`~glm_api.families.
    quantized_load`; a transformers checkpoint whose names the model does not share is loaded
    whole and quantised module by module after). On CPU the remaining linear
    weights are then stored input-major (same values, faster decode steps; see
    :mod:`glm_api.families.weight_layout`).
    """
    path = Path(path)
    check_quantize_supported(quantize, device)  # before minutes of loading
    family = detect_chat_family(path, trust_remote_code)
    logger.info("chat model %s: loading as %s on %s in %s", path, family, device, dtype)
    if family == "gguf":
        gguf = _gguf_file(path)
        assert gguf is not None  # detect_chat_family said so
        loaded = load_gguf(gguf, device if split is None else torch.device("cpu"), dtype, cache_dir, quantize)
        if split is not None:
            split.place(loaded.model, dtype).dispatch(loaded.model)
    elif family == "chatglm3":
        from glm_api.families.chatglm3 import load_chatglm3

        loaded = load_chatglm3(path, device, dtype, quantize, split=split)
    else:
        loaded = load_transformers_lm(path, device, dtype, trust_remote_code, split=split, quantize=quantize)
    if quantize != "none":
        logger.info("chat model %s: %s", path, quantization_report(loaded.model, quantize, dtype).line())
    if device.type == "cpu":
        store_linear_weights_input_major(loaded.model)
    return loaded
