"""Wire shapes of the rerank and score routes.

- ``/rerank``, ``/v1/rerank``: Jina's and Cohere's v1 shape (what vLLM, TEI and infinity
  serve): a query, documents as strings or ``{"text": ...}`` objects, ``top_n``,
  ``return_documents``; results sorted by ``relevance_score``, plus ``usage``.
- ``/v2/rerank``: Cohere's v2 shape (string documents, ``max_tokens_per_doc``; results carry
  no documents; ``meta`` says the tokens).
- ``/score``, ``/v1/score``: vLLM's shape: ``text_1`` against ``text_2``, one to many or pairwise.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from glm_api.protocol.common import WireModel


def _document_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return value["text"]
    raise ValueError('each document must be a string or an object with a string "text"')


class RerankRequest(WireModel):
    """Jina / Cohere v1 rerank."""

    model: str | None = None
    query: str
    documents: list[str | dict[str, Any]] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True
    # Ours, as on /v1/embeddings: truncate over-long pairs instead of a 400.
    truncate: bool = False

    @field_validator("documents")
    @classmethod
    def _documents_have_text(cls, value: list) -> list:
        for document in value:
            _document_text(document)
        return value

    def document_texts(self) -> list[str]:
        return [_document_text(d) for d in self.documents]


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class RerankV2Request(WireModel):
    """Cohere v2 rerank: documents are strings; long ones are truncated, as Cohere does."""

    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1)
    max_tokens_per_doc: int | None = Field(None, ge=1)


class RerankV2Result(BaseModel):
    index: int
    relevance_score: float


class CohereApiVersion(BaseModel):
    version: str = "2"


class CohereBilledUnits(BaseModel):
    search_units: int = 1


class CohereTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class CohereMeta(BaseModel):
    api_version: CohereApiVersion = Field(default_factory=CohereApiVersion)
    billed_units: CohereBilledUnits = Field(default_factory=CohereBilledUnits)
    tokens: CohereTokens


class RerankV2Response(BaseModel):
    id: str
    results: list[RerankV2Result]
    meta: CohereMeta


class ScoreRequest(WireModel):
    """vLLM's /score: ``text_1`` (one text, or a list) against ``text_2``: one text against each
    of the others, or the lists pairwise when they have the same length."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate: bool = False

    @model_validator(mode="after")
    def _shapes_pair_up(self) -> "ScoreRequest":
        first = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        second = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if not first or not second:
            raise ValueError("text_1 and text_2 must not be empty")
        if len(first) > 1 and len(first) != len(second):
            raise ValueError(
                f"text_1 has {len(first)} texts and text_2 {len(second)}: "
                "give one text_1, or as many as text_2 (pairwise)"
            )
        return self

    def pairs(self) -> list[tuple[str, str]]:
        first = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        second = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if len(first) == 1:
            return [(first[0], t) for t in second]
        return list(zip(first, second))


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage
