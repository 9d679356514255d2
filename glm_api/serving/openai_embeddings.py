"""/v1/embeddings over the shared EmbeddingService.

Vectors are exactly the seed route's for the same text (the model's own output, normalised
only if the model does so itself or ``normalize: true`` is asked). Differences in policy, not
in numbers: an input over the model's limit is a 400 here unless ``truncate: true`` (the
seed route truncates silently); token-array inputs are decoded with the model's own
tokenizer and embedded as that text. ``dimensions`` below the model's keeps the first
``dimensions`` values and L2-normalises them, as OpenAI's Matryoshka models do: meaningful
for Matryoshka-trained models; for others it is the client's trade of quality for size.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np

from glm_api.errors import BadRequestError
from glm_api.protocol.openai import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from glm_api.serving.embeddings import EmbeddingService
from glm_api.serving.tokenize import decode_ids


def _texts(engine, value: str | list) -> list[str]:
    """Input as texts; token arrays decoded with the model's tokenizer. Blocking: a thread."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(x, int) for x in value):
        return [decode_ids(engine, value, param="input")]
    return [x if isinstance(x, str) else decode_ids(engine, x, param="input") for x in value]


def base64_floats(vector: np.ndarray) -> str:
    """What the openai SDK decodes: little-endian float32 bytes, base64."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def shorten(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """First ``dimensions`` values of each row, L2-normalised (Matryoshka truncation)."""
    cut = vectors[:, :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)


async def create_embeddings(service: EmbeddingService, req: EmbeddingRequest) -> EmbeddingResponse:
    engine = service.engine(req.model)
    if req.dimensions is not None and req.dimensions > engine.dimensions:
        raise BadRequestError(
            f"dimensions is {req.dimensions}; model {engine.model_name!r} gives {engine.dimensions}",
            param="dimensions",
        )
    needs_thread = not isinstance(req.input, str) and any(not isinstance(x, str) for x in req.input)
    texts = await asyncio.to_thread(_texts, engine, req.input) if needs_thread else _texts(engine, req.input)
    result = await service.embed(engine, texts, truncate=req.truncate, normalize=req.normalize)
    vectors = result.vectors
    if req.dimensions is not None and req.dimensions < engine.dimensions:
        vectors = shorten(vectors, req.dimensions)
    as_base64 = req.encoding_format == "base64"
    data = [
        EmbeddingData(index=i, embedding=base64_floats(v) if as_base64 else v.tolist()) for i, v in enumerate(vectors)
    ]
    tokens = sum(result.token_counts)
    return EmbeddingResponse(
        data=data, model=engine.model_name, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )
