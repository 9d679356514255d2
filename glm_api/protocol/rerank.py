"""Wire shapes of the rerank and score routes.

- ``/rerank``, ``/v1/rerank``: Jina's and Cohere's v1 shape (what vLLM, TEI and infinity
  serve): a query, documents as strings or ``{"text": ...}`` objects, ``top_n``,
  ``return_documents``; results sorted by ``relevance_score``, plus ``usage``.
- ``/v2/rerank``: Cohere's v2 shape (string documents, ``max_tokens_per_doc``; results carry
  no documents; ``meta`` says the tokens).
- ``/score``, ``/v1/score``: vLLM's shape: ``text_1`` against ``text_2``, one to many or pairwise.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from glm_api.protocol.common import JsonWireModel, json_int

#: At least one: the bound above (how many pairs one request scores) is the server's setting,
#: stated in the served spec (``glm_api.openapi_limits``).
TopN = json_int(ge=1)


class RerankDocumentIn(JsonWireModel):
    """A document as an object (Jina, Cohere v1): its ``text`` is what is scored; other fields
    are accepted and ignored."""

    text: str


class RerankRequest(JsonWireModel):
    """Jina / Cohere v1 rerank."""

    model: str | None = None
    query: str
    documents: list[str | RerankDocumentIn] = Field(min_length=1)
    top_n: TopN | None = None
    return_documents: bool = True
    # Ours, as on /v1/embeddings: truncate over-long pairs instead of a 400.
    truncate: bool = False

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


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


class RerankV2Request(JsonWireModel):
    """Cohere v2 rerank: documents are strings; long ones are truncated, as Cohere does."""

    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: TopN | None = None
    max_tokens_per_doc: TopN | None = None


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


Texts = Annotated[list[str], Field(min_length=1)]


class ScoreRequest(JsonWireModel):
    """vLLM's /score: ``text_1`` (one text, or a list) against ``text_2``: one text against each
    of the others, or the lists pairwise when they have the same length (a rule relating two
    values, which the spec cannot state: tests/schemathesis_hooks.py keeps it)."""

    model: str | None = None
    text_1: str | Texts
    text_2: str | Texts
    truncate: bool = False

    @model_validator(mode="after")
    def _shapes_pair_up(self) -> "ScoreRequest":
        first = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        second = [self.text_2] if isinstance(self.text_2, str) else self.text_2
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
