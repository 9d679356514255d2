"""Cross-encoder (reranker) family: local sequence-classification folders with one label,
served through sentence-transformers' ``CrossEncoder``.

BERT- and XLM-R-based rerankers (the bge-reranker family, ms-marco cross-encoders) are folders
with a ``*ForSequenceClassification`` config and one label: the model reads a query and a
document together and gives one logit. The score is that logit through the activation the
folder asks for, exactly as ``CrossEncoder.predict`` computes it: the
``sentence_transformers.activation_fn`` of its config (``torch.*`` paths only: anything else
would be remote code), else ``Sigmoid`` for one label. We load the folder as a
``CrossEncoder`` and keep its ``activation_fn``, so the two cannot drift apart.

As in :mod:`glm_api.families.embedding`, the helpers block and the engine batches:
:func:`prepare` (tokenise pairs, truncated, padded) then :func:`forward` (one pass, scores).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_api.families import embedding
from glm_api.families.json_file import read_json

logger = logging.getLogger(__name__)

FAMILY_CROSS_ENCODER = "cross-encoder"

Pair = tuple[str, str]


@dataclass
class LoadedCrossEncoder:
    """A reranker: a sentence-transformers ``CrossEncoder`` with one output label."""

    model: Any
    max_seq_length: int
    family: str
    source: str


def detect_cross_encoder(path: Path) -> str:
    """``"cross-encoder"`` for a folder this family can serve; ``ValueError`` saying why not."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    path = Path(path)
    if not path.exists():
        raise ValueError(f"rerank model folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"rerank model path {path} is not a folder")
    modules_json = path / "modules.json"
    if modules_json.is_file():
        modules = read_json(modules_json, "sentence-transformers modules")
        custom = [m.get("type") for m in modules if not str(m.get("type", "")).startswith("sentence_transformers.")]
        if custom:
            raise ValueError(f"{path} uses the custom module {custom[0]!r}: it needs remote code, which is not allowed")
    config = embedding._check_transformer_folder(path, require_encoder=False)
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"{path} holds {', '.join(architectures) or config.get('model_type')}, not a sequence-classification "
            "model (a cross-encoder reranker such as bge-reranker)"
        )
    if config.get("model_type") not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(
            f"{path}: model_type {config.get('model_type')!r} has no sequence-classification head in transformers"
        )
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) else config.get("num_labels", 2)
    if num_labels != 1:
        raise ValueError(f"{path} is a classifier with {num_labels} labels; a reranker gives one score (one label)")
    return FAMILY_CROSS_ENCODER


def load_cross_encoder(path: Path, device: torch.device, dtype: torch.dtype) -> LoadedCrossEncoder:
    """Load a reranker folder as a ``CrossEncoder`` (local files only, no remote code).

    Pairs are truncated to the tokenizer's ``model_max_length`` as ``CrossEncoder`` does,
    capped by the model's position table (some folders leave that length unset: 10^30).
    """
    from sentence_transformers import CrossEncoder

    path = Path(path)
    detect_cross_encoder(path)
    model = CrossEncoder(
        str(path),
        device=str(device),
        trust_remote_code=False,
        local_files_only=True,
        model_kwargs={"dtype": dtype},
    )
    first = model[0]
    if getattr(first, "tokenizer", None) is None:
        raise ValueError(f"{path}: the first module is not a text Transformer with a tokenizer")
    first.unpad_inputs = False  # token counts are read per row from the padded layout
    limit = embedding._position_limit(first)
    current = model.max_seq_length
    if current is None or (limit is not None and current > limit):
        model.max_seq_length = limit if limit is not None else embedding.DEFAULT_MAX_SEQ_LENGTH
    model.eval()
    embedding._tokenizer_lock(model)  # created now, before any thread can race to create it
    logger.info(
        "loaded rerank model %s (%s, activation %s, max_seq_length %d, %s on %s)",
        path, FAMILY_CROSS_ENCODER, type(model.activation_fn).__name__, model.max_seq_length, dtype, device,
    )
    return LoadedCrossEncoder(
        model=model, max_seq_length=int(model.max_seq_length), family=FAMILY_CROSS_ENCODER, source=str(path)
    )


def prepare(loaded: LoadedCrossEncoder, pairs: list[Pair]) -> dict[str, Any]:
    """Tokenise pairs as ``predict`` would (query and document together, truncated, padded)."""
    return embedding._preprocess(loaded.model, [tuple(p) for p in pairs])


def forward(loaded: LoadedCrossEncoder, features: dict[str, Any]) -> np.ndarray:
    """One pass over prepared features: the scores, float32 ``[n]`` (``predict``'s numbers)."""
    from sentence_transformers.util import batch_to_device

    model = loaded.model
    with torch.inference_mode():
        scores = model(batch_to_device(features, model.device))["scores"]
        # The same steps, in the same order, as CrossEncoder._inference.
        if torch.is_floating_point(scores) and torch.finfo(scores.dtype).bits < 32:
            scores = scores.float()
        if model.activation_fn is not None:
            scores = model.activation_fn(scores)
        if scores.ndim > 1:
            scores = scores.squeeze(-1)
    return scores.detach().to(device="cpu", dtype=torch.float32).numpy()


def count_tokens(loaded: LoadedCrossEncoder, pairs: list[Pair]) -> list[int]:
    """Tokens each pair would take together, without truncation, to refuse over-long pairs."""
    if not pairs:
        return []
    features = embedding._preprocess(
        loaded.model, [tuple(p) for p in pairs],
        processing_kwargs={"text": {"truncation": False, "verbose": False}},
    )
    return [len(ids) for ids in embedding._unpad(features)]


clip_texts = embedding.clip_texts  # reads only ``loaded.model.tokenizer``
token_lengths = embedding.token_lengths
take_rows = embedding.take_rows  # reads only ``loaded.model.tokenizer``: shared as it is
