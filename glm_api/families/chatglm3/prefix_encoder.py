"""P-Tuning v2 prefixes of ChatGLM3, as THUDM's fine-tuning demos make them: read, checked, encoded.

A P-Tuning v2 checkpoint's ``config.json`` carries ``pre_seq_len`` (and ``prefix_projection``);
its weights hold ``transformer.prefix_encoder.embedding.weight`` (``pre_seq_len`` rows of
``num_layers * 2 * multi_query_group_num * kv_channels``) and, with ``prefix_projection``, a
two-layer MLP ``transformer.prefix_encoder.trans.{0,2}.{weight,bias}`` (Linear to
``hidden_size``, Tanh, Linear back). The folder is either a whole checkpoint (today's
``finetune_hf.py`` saves the whole model) or the prefix encoder alone beside a base (the
earlier demo's trainer saved only the trained parameters).

What ChatGLM3's own code (``modeling_chatglm.py``: ``PrefixEncoder``, ``ChatGLMModel.get_prompt``
and ``forward``) does with it, and :func:`prefix_key_values` reproduces: the encoder runs on
``arange(pre_seq_len)`` in the model's dtype; its output is viewed as ``(pre_seq_len,
num_layers * 2, groups, kv_channels)`` and split so that layer ``i``'s past keys are slice
``2i`` and its past values ``2i + 1`` (dropout is off at inference). The layer puts them before
its own keys as they are: rotary embeddings are applied to the new tokens' keys only, never to
the prefix; the attention mask over the prefix is all ones; the real tokens' position ids start
at 0, not at ``pre_seq_len``. The engine keeps these keys/values pinned in its KV pool
(:mod:`glm_api.engines.pinned_prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from glm_api.families.chatglm3.checkpoint import ChatGLM3Config, read_chatglm3_config
from glm_api.families.json_file import read_json
from glm_api.families.tensor_stream import iter_checkpoint, listing, weight_files

PREFIX_KEY = "transformer.prefix_encoder."
_EMBEDDING = "embedding.weight"
_PROJECTION = ("trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias")


def is_ptuning_folder(path: str | Path) -> bool:
    """Whether ``path/config.json`` declares a P-Tuning v2 prefix (``pre_seq_len``)."""
    try:
        raw = read_json(Path(path) / "config.json", "config")
    except ValueError:
        return False
    return isinstance(raw, dict) and bool(raw.get("pre_seq_len"))


def read_ptuning_config(folder: Path) -> ChatGLM3Config:
    """The folder's validated ChatGLM3 config, which must declare ``pre_seq_len``."""
    cfg = read_chatglm3_config(folder)
    if cfg.pre_seq_len is None:
        raise ValueError(f"{folder / 'config.json'}: no 'pre_seq_len': not a P-Tuning v2 checkpoint")
    return cfg


def check_compatible(prefix: ChatGLM3Config, base: ChatGLM3Config, where: Path) -> None:
    """ValueError naming each field in which the prefix's model and the base differ: the
    prefix's keys/values must have the base's layers, kv groups and head width."""
    fields = (("num_layers", "num_layers"), ("multi_query_group_num", "kv_groups"), ("kv_channels", "kv_channels"))
    wrong = [
        f"{name} {getattr(prefix, attr)} (the base has {getattr(base, attr)})"
        for name, attr in fields
        if getattr(prefix, attr) != getattr(base, attr)
    ]
    if wrong:
        raise ValueError(f"{where}: this P-Tuning v2 prefix was trained for another model shape: {', '.join(wrong)}")


def kv_size(cfg: ChatGLM3Config) -> int:
    """Width of one prefix position: keys and values of every layer."""
    return cfg.num_layers * 2 * cfg.kv_groups * cfg.kv_channels


def expected_shapes(cfg: ChatGLM3Config) -> dict[str, tuple[int, ...]]:
    """The prefix encoder's tensors (names after ``transformer.prefix_encoder.``) and shapes."""
    assert cfg.pre_seq_len is not None
    width = kv_size(cfg)
    shapes: dict[str, tuple[int, ...]] = {_EMBEDDING: (cfg.pre_seq_len, width)}
    if cfg.prefix_projection:
        h = cfg.hidden_size
        shapes.update(zip(_PROJECTION, ((h, width), (h,), (width, h), (width,))))
    return shapes


def load_prefix_weights(folder: Path, cfg: ChatGLM3Config) -> dict[str, torch.Tensor]:
    """The prefix encoder's tensors from ``folder``'s weights (a whole checkpoint or the encoder
    alone; with an index, only the shards that hold them are opened), checked against ``cfg``."""
    files, indexed = weight_files(folder)
    if indexed is not None:  # an index: open only the shards that hold the encoder
        files = [f for f in files if _shard_holds_prefix(f)]
    found: dict[str, torch.Tensor] = {}
    for file in files:
        for key, tensor, _release in iter_checkpoint(file):
            if key.startswith(PREFIX_KEY):
                found[key.removeprefix(PREFIX_KEY)] = tensor.clone()  # the file's pages are given back
    shapes = expected_shapes(cfg)
    missing = set(shapes) - set(found)
    if missing:
        raise ValueError(
            f"{folder}: P-Tuning v2 weights missing: {listing({PREFIX_KEY + m for m in missing})} "
            f"(config.json: pre_seq_len {cfg.pre_seq_len}, prefix_projection {cfg.prefix_projection})"
        )
    extra = set(found) - set(shapes)
    if extra:
        raise ValueError(f"{folder}: unexpected prefix encoder weights: {listing({PREFIX_KEY + e for e in extra})}")
    for name, shape in shapes.items():
        if tuple(found[name].shape) != shape:
            raise ValueError(
                f"{folder}: {PREFIX_KEY}{name} has shape {tuple(found[name].shape)}, expected {shape} from config.json "
                "(pre_seq_len, num_layers, multi_query_group_num, kv_channels, hidden_size)"
            )
    return found


def _shard_holds_prefix(file: Path) -> bool:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = file.parent / index_name
        if index.is_file():
            weight_map = read_json(index, "weight index").get("weight_map", {})
            return any(key.startswith(PREFIX_KEY) and name == file.name for key, name in weight_map.items())
    return True


@torch.inference_mode()
def prefix_key_values(
    weights: dict[str, torch.Tensor], cfg: ChatGLM3Config, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's prefix keys and values, ``[groups, pre_seq_len, kv_channels]`` each, as
    ChatGLM3's ``get_prompt`` computes them: the encoder in ``dtype`` over positions
    ``0 .. pre_seq_len - 1`` (its embedding rows, in order), through the MLP when it has one."""
    assert cfg.pre_seq_len is not None

    def w(name: str) -> torch.Tensor:
        return weights[name].to(device=device, dtype=dtype)

    out = w(_EMBEDDING)  # embedding(arange(pre_seq_len)) is the table itself
    if cfg.prefix_projection:
        hidden = torch.tanh(F.linear(out, w("trans.0.weight"), w("trans.0.bias")))
        out = F.linear(hidden, w("trans.2.weight"), w("trans.2.bias"))
    out = out.view(cfg.pre_seq_len, cfg.num_layers * 2, cfg.kv_groups, cfg.kv_channels).permute(1, 2, 0, 3)
    return [(out[2 * i].contiguous(), out[2 * i + 1].contiguous()) for i in range(cfg.num_layers)]
