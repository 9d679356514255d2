"""Load a ChatGLM3 checkpoint folder into transformers' native ``GlmForCausalLM``.

THUDM's remote code no longer runs on current transformers, but the architecture is the one
``GlmForCausalLM`` implements (see DESIGN.md "Model facts"), so the weights are renamed and
the fused qkv split on the fly. The model is built on the meta device and each checkpoint
tensor is converted, cast and moved to the target device as its memory-mapped shard is
read, so the weights never exist twice in memory (beyond one shard's file pages).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from glm_api.families.json_file import read_json
from glm_api.families.base import LoadedChatModel
from glm_api.families.chatglm3.template import ChatGLM3Template
from glm_api.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from glm_api.families.glm4_chat import Glm4ChatTemplate, is_glm4_tokenizer, load_glm4_template
from glm_api.families.quantize import QuantMode, replace_modules
from glm_api.families.quantized_modules import QUANTIZED
from glm_api.families.tensor_stream import assign, check_all_loaded, iter_checkpoint, listing, weight_files

if TYPE_CHECKING:
    from glm_api.device_map import LayerSplit

_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
# Per-layer ChatGLM names -> GlmForCausalLM names (the fused qkv is handled apart).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_DROPPED = {"rotary_pos_emb.inv_freq"}  # recomputed by GlmRotaryEmbedding
# config.json flags whose other value means an architecture GlmForCausalLM does not have.
_REQUIRED_FLAGS = {
    "rmsnorm": True,
    "add_bias_linear": False,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "original_rope": True,
}
PREFIX_ENCODER = "prefix_encoder."  # P-Tuning v2 weights, under transformer.
_UNEXPECTED = "unexpected weights (not ChatGLM3, or more layers than config.json says)"


@dataclass(frozen=True)
class ChatGLM3Config:
    """The config.json fields the conversion needs, validated."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_channels: int
    kv_groups: int
    ffn_hidden_size: int
    padded_vocab_size: int
    seq_length: int
    rope_ratio: float
    layernorm_epsilon: float
    add_qkv_bias: bool
    # A P-Tuning v2 checkpoint (THUDM's finetune demo): its prefix encoder's length; the
    # encoder's weights are read apart (:mod:`~glm_api.families.chatglm3.prefix_encoder`).
    pre_seq_len: int | None = None
    prefix_projection: bool = False

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        d = self.kv_channels
        return self.num_attention_heads * d, self.kv_groups * d, self.kv_groups * d


def _is_chatglm_config(raw: Any) -> bool:
    return isinstance(raw, dict) and (
        raw.get("model_type") == "chatglm" or "ChatGLMModel" in (raw.get("architectures") or [])
    )


def is_chatglm3_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like a ChatGLM2/3-style checkpoint (THUDM's ``ChatGLMModel``),
    GLM-4-9B-chat's remote-code folders included (same layout, own tokenizer: :func:`chat_template`).

    ChatGLM-6B (v1, no ``kv_channels``) shares the model type but not the format: not claimed.
    """
    folder = Path(path)
    try:
        raw = read_json(folder / "config.json", "config")
    except ValueError:
        return False
    return _is_chatglm_config(raw) and "kv_channels" in raw


def read_chatglm3_config(folder: Path) -> ChatGLM3Config:
    """Validated fields of ``folder/config.json``; ValueError naming the file and the field."""
    path = folder / "config.json"
    raw = read_json(path, "config")
    if not _is_chatglm_config(raw):
        raise ValueError(f"{path}: not a ChatGLM3 config (expected model_type 'chatglm' / architecture 'ChatGLMModel')")

    def positive_int(name: str, default: int | None = None) -> int:
        value = raw.get(name, default)
        if value is None:
            raise ValueError(f"{path}: missing required field '{name}'")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: field '{name}' must be a positive integer, got {value!r}")
        return value

    for flag, needed in _REQUIRED_FLAGS.items():
        if flag in raw and bool(raw[flag]) != needed:
            raise ValueError(f"{path}: '{flag}: {raw[flag]}' is not supported (only {needed}, as in ChatGLM3)")
    pre_seq_len = positive_int("pre_seq_len") if raw.get("pre_seq_len") is not None else None
    if raw.get("quantization_bit"):
        raise ValueError(f"{path}: quantised checkpoints (quantization_bit) are not supported")

    heads = positive_int("num_attention_heads")
    groups = positive_int("multi_query_group_num") if raw.get("multi_query_attention") else heads
    if heads % groups:
        raise ValueError(f"{path}: num_attention_heads {heads} is not a multiple of multi_query_group_num {groups}")
    kv_channels = positive_int("kv_channels")
    if kv_channels % 4:
        raise ValueError(f"{path}: kv_channels {kv_channels} must be a multiple of 4 (rotary on half the head)")
    rope_ratio = raw.get("rope_ratio", 1)
    eps = raw.get("layernorm_epsilon", 1e-5)
    for name, value in (("rope_ratio", rope_ratio), ("layernorm_epsilon", eps)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: field '{name}' must be a positive number, got {value!r}")
    return ChatGLM3Config(
        num_layers=positive_int("num_layers"),
        hidden_size=positive_int("hidden_size"),
        num_attention_heads=heads,
        kv_channels=kv_channels,
        kv_groups=groups,
        ffn_hidden_size=positive_int("ffn_hidden_size"),
        padded_vocab_size=positive_int("padded_vocab_size"),
        seq_length=positive_int("seq_length"),
        rope_ratio=float(rope_ratio),
        layernorm_epsilon=float(eps),
        add_qkv_bias=bool(raw.get("add_qkv_bias", False)),
        pre_seq_len=pre_seq_len,
        prefix_projection=bool(raw.get("prefix_projection", False)),
    )


def chat_template(folder: Path) -> tuple[ChatGLM3Template | Glm4ChatTemplate, str]:
    """The folder's tokenizer and chat format, and the family name they make: ChatGLM3's
    sentencepiece one, or GLM-4-9B-chat's tiktoken one (the weights are laid out alike)."""
    if is_glm4_tokenizer(folder):
        return load_glm4_template(folder), "chatglm4"
    return ChatGLM3Template(ChatGLM3Tokenizer(folder / "tokenizer.model")), "chatglm3"


def glm_config(cfg: ChatGLM3Config, template: ChatGLM3Template | Glm4ChatTemplate, dtype: torch.dtype) -> Any:
    """The ``GlmConfig`` equivalent of a ChatGLM3 config (DESIGN.md "Model facts")."""
    from transformers import GlmConfig

    tokenizer = template.tokenizer
    config = GlmConfig(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_groups,
        head_dim=cfg.kv_channels,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.layernorm_epsilon,
        attention_bias=cfg.add_qkv_bias,
        tie_word_embeddings=False,
        # ChatGLM3 scales the base, not the positions: theta = 10000 * rope_ratio.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * cfg.rope_ratio,
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=tokenizer.pad_id,
        bos_token_id=None,
        eos_token_id=_stop_ids(template),
    )
    config.dtype = dtype
    return config


def _stop_ids(template: ChatGLM3Template | Glm4ChatTemplate) -> list[int]:
    eos = template.tokenizer.eos_id
    return [eos, *sorted(template.stop_token_ids - {eos})]


def target_names(key: str, cfg: ChatGLM3Config) -> tuple[str, ...] | None:
    """GlmForCausalLM names one checkpoint key becomes: () when it is dropped, three for the
    fused qkv, None when the key is not part of ChatGLM3 (or of this config's layers)."""
    name = key.removeprefix("transformer.")
    if name in _DROPPED or (cfg.pre_seq_len is not None and name.startswith(PREFIX_ENCODER)):
        return ()  # a P-Tuning v2 prefix encoder is not part of the base model
    if name in _TOP_RENAMES:
        return (_TOP_RENAMES[name],)
    match = _LAYER_KEY.fullmatch(name)
    if match is None or int(match.group(1)) >= cfg.num_layers:
        return None
    prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
    if rest in _LAYER_RENAMES:
        return (prefix + _LAYER_RENAMES[rest],)
    if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
        suffix = rest.rsplit(".", 1)[1]
        return tuple(f"{prefix}self_attn.{proj}.{suffix}" for proj in ("q_proj", "k_proj", "v_proj"))
    return None


def convert_key(key: str, tensor: torch.Tensor, cfg: ChatGLM3Config) -> list[tuple[str, torch.Tensor]] | None:
    """(GlmForCausalLM name, tensor) pairs for one checkpoint tensor (see :func:`target_names`)."""
    names = target_names(key, cfg)
    if names is None or len(names) < 3:
        return None if names is None else [(name, tensor) for name in names]
    if tensor.shape[0] != sum(cfg.qkv_sizes):
        raise ValueError(
            f"{key}: {tensor.shape[0]} rows, expected {sum(cfg.qkv_sizes)} "
            "(num_attention_heads, multi_query_group_num and kv_channels in config.json disagree with the weights)"
        )
    # Not interleaved per head: all q heads, then the k groups, then the v groups.
    return list(zip(names, tensor.split(cfg.qkv_sizes, dim=0)))


def load_weights(
    model: nn.Module, folder: Path, cfg: ChatGLM3Config, device: torch.device | Callable[[str], torch.device], dtype: torch.dtype
) -> None:
    """Fill the meta-device ``model`` from the folder's shards, one tensor at a time, each on
    ``device`` (or ``device(name)``: a model split over devices, see :mod:`glm_api.device_map`)."""
    files, indexed_keys = weight_files(folder)
    if indexed_keys is not None:  # fail before reading gigabytes when the index already tells
        unknown = {key for key in indexed_keys if target_names(key, cfg) is None}
        if unknown:
            raise ValueError(f"{folder}: {_UNEXPECTED}: {listing(unknown)}")
    expected = {name for name, _ in model.named_parameters()} | {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, QUANTIZED)
    }
    filled: set[str] = set()
    unexpected: set[str] = set()
    for file in files:
        for key, tensor, release in iter_checkpoint(file):
            converted = convert_key(key, tensor, cfg)
            if converted is None:
                unexpected.add(key)
                continue
            for name, part in converted:
                if name in filled:
                    raise ValueError(f"{file}: {key} appears twice in the checkpoint")
                assign(model, name, part, device(name) if callable(device) else device, dtype, release)
                filled.add(name)
            del tensor, converted
    if unexpected:
        raise ValueError(f"{folder}: {_UNEXPECTED}: {listing(unexpected)}")
    missing = expected - filled
    if missing and not filled and cfg.pre_seq_len is not None:
        raise ValueError(
            f"{folder}: holds a P-Tuning v2 prefix encoder and no base weights; serve it over its base "
            "model with --ptuning NAME=PATH (GLM_API_PTUNING)"
        )
    if missing:
        raise ValueError(f"{folder}: weights missing from the checkpoint: {listing(missing)}")


def load_chatglm3(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    quantize: QuantMode = "none",
    split: LayerSplit | None = None,
) -> LoadedChatModel:
    """A ChatGLM3 folder (config.json, tokenizer.model, .bin or safetensors weights) as a
    ``GlmForCausalLM`` in eval mode on ``device`` in ``dtype``, with its template; with
    ``quantize`` its decoder's linear layers hold int8 or int4 weights, quantised as they load.
    With ``split`` its layers spread over the split's devices instead, each tensor streamed to
    its layer's device."""
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    cfg = read_chatglm3_config(folder)
    template, family = chat_template(folder)
    tokenizer = template.tokenizer
    if tokenizer.vocab_size > cfg.padded_vocab_size:
        raise ValueError(
            f"{folder / 'tokenizer.model'}: {tokenizer.vocab_size} tokens (with specials) do not fit "
            f"padded_vocab_size {cfg.padded_vocab_size} of config.json"
        )
    config = glm_config(cfg, template, dtype)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    if quantize != "none":
        replace_modules(model, quantize, device, dtype)
    placement = split.place(model, dtype) if split is not None else None
    load_weights(model, folder, cfg, placement.device_of if placement else device, dtype)
    # Its buffers are not in the checkpoint: build the rotary embedding for real on the device.
    rotary_device = placement.device_of("model.rotary_emb") if placement else device
    model.model.rotary_emb = GlmRotaryEmbedding(config=config).to(rotary_device)
    check_all_loaded(model, folder)
    if placement is not None:
        placement.dispatch(model)
    model.eval()
    model.generation_config.eos_token_id = _stop_ids(template)
    model.generation_config.pad_token_id = tokenizer.pad_id
    model.generation_config.bos_token_id = None
    return LoadedChatModel(
        model=model,
        template=template,
        context_length=cfg.seq_length,
        family=family,
        source=str(folder),
    )

