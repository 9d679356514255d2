"""Wire models of the OpenAI Files and Batch APIs (``/v1/files``, ``/v1/batches``) and of a batch
file's lines. The shapes are the ``openai`` package's ``FileObject``, ``Batch``,
``FileDeleted`` and cursor pages; a line is ``{"custom_id", "method", "url", "body"}`` in and
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`` out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from glm_api.protocol.common import JsonWireModel

#: The endpoints a batch line can call, as OpenAI spells them.
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
BATCH_ENDPOINTS: tuple[str, ...] = BatchEndpoint.__args__  # type: ignore[attr-defined]

#: An upload's purpose, as OpenAI names them; a ``batch`` file is JSONL (its first line an object).
FilePurpose = Literal["batch", "batch_output", "user_data", "assistants", "fine-tune", "vision"]
PURPOSES: tuple[str, ...] = FilePurpose.__args__  # type: ignore[attr-defined]

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreateRequest(JsonWireModel):
    input_file_id: str
    # Checked in serving (endpoint_served), which names the endpoints; the served spec states
    # those of the loaded models (glm_api.openapi_limits).
    endpoint: str = Field(description="one of " + ", ".join(BATCH_ENDPOINTS))
    # At most 7 digits (over 1,000 years): expires_at stays an exact JSON integer (< 2**53), not
    # a number a client's double rounds.
    completion_window: str = Field(
        "24h", pattern=r"^[0-9]{1,7}[smh]$", description='"24h" (OpenAI\'s only value), or N s/m/h'
    )
    metadata: dict[str, str] | None = Field(None, max_length=16)


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchLine(BaseModel):
    """One line of a batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1)
    method: Literal["POST"] = "POST"
    url: str
    body: dict[str, Any]
