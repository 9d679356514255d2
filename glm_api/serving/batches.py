"""The Files and Batch APIs over :mod:`glm_api.storage`: protocol in, protocol out.

Everything here belongs to an ``owner`` (a digest of the API key that made it; ``""`` with keys
off): another owner's file or batch is a 404, as if it did not exist. Every check that can
refuse a batch (file, size, JSONL, endpoint) runs before the batch exists; what is wrong with a
single line is that line's entry in the error file.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP

from glm_api.batch_runner import BatchRunner, window_seconds
from glm_api.config import Settings
from glm_api.errors import BadRequestError, NotFoundError
from glm_api.protocol.batch import (
    Batch,
    BatchCreateRequest,
    BatchList,
    BatchRequestCounts,
    FileDeleted,
    FileList,
    FileObject,
    PURPOSES,
)
from glm_api.serving.batch_lines import endpoint_served, looks_like_jsonl
from glm_api.state import Services
from glm_api.storage import DB_NAME, Storage, StoredFile, new_id

#: Most items of one list page (files: 10,000 as OpenAI; batches ask at most 100).
MAX_PAGE = 10_000


class BatchStore:
    """The Batch API's storage and runner, opened on first use (or at start-up when a previous
    run left a database, to resume its batches): a server that never sees a batch writes nothing."""

    def __init__(self, settings: Settings, services: Callable[[], Services | None]) -> None:
        self.settings = settings
        self._services = services
        self._lock = asyncio.Lock()
        self.storage: Storage | None = None
        self.runner: BatchRunner | None = None

    async def start(self) -> None:
        if (self.settings.data_dir / DB_NAME).exists():
            await self.open()

    async def open(self) -> tuple[Storage, BatchRunner]:
        async with self._lock:
            if self.storage is None or self.runner is None:
                storage = await asyncio.to_thread(Storage, self.settings.data_dir)
                runner = BatchRunner(
                    storage, self._services, max_running=self.settings.max_running, share=self.settings.batch_slots(),
                    shutdown_grace=self.settings.shutdown_grace_seconds,
                )
                await runner.start()
                self.storage, self.runner = storage, runner
            return self.storage, self.runner

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.stop()
        if self.storage is not None:
            await asyncio.to_thread(self.storage.close)


def owner_of(api_key: str | None) -> str:
    """Who owns what a request makes: the key's digest (the key itself is never stored)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else ""


def file_object(f: StoredFile) -> FileObject:
    return FileObject(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose)


def parse_upload(content_type: str, body: bytes) -> tuple[str, str, bytes]:
    """``(purpose, filename, bytes)`` of a ``multipart/form-data`` upload (the standard library's
    MIME parser: no extra dependency)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadRequestError("upload the file as multipart/form-data with fields 'file' and 'purpose'")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise BadRequestError("the multipart body cannot be read")
    purpose, filename, content = None, None, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name == "purpose":
            purpose = part.get_payload(decode=True).decode("utf-8", "replace").strip()
        elif name == "file":
            filename = part.get_filename() or "upload.jsonl"
            content = part.get_payload(decode=True) or b""
    if content is None:
        raise BadRequestError("no 'file' field in the upload", param="file")
    if purpose is None:
        raise BadRequestError("no 'purpose' field in the upload", param="purpose")
    return purpose, filename, content


async def upload_file(storage: Storage, settings: Settings, owner: str, content_type: str, body: bytes) -> FileObject:
    purpose, filename, content = await asyncio.to_thread(parse_upload, content_type, body)
    if purpose not in PURPOSES:
        raise BadRequestError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}", param="purpose")
    if len(content) > settings.batch_max_file_bytes:
        raise BadRequestError(
            f"the file is {len(content)} bytes; at most {settings.batch_max_file_bytes} (batch_max_file_bytes)",
            param="file", code="file_too_large",
        )
    if purpose == "batch":
        why = await asyncio.to_thread(looks_like_jsonl, content)
        if why is not None:
            raise BadRequestError(why, param="file", code="invalid_file_format")
    return file_object(await asyncio.to_thread(storage.add_file, owner, purpose, filename, content))


async def _owned_file(storage: Storage, owner: str, file_id: str) -> StoredFile:
    found = await asyncio.to_thread(storage.get_file, file_id, owner)
    if found is None:
        raise NotFoundError(f"no file {file_id!r}", param="file_id", code="not_found")
    return found


async def get_file(storage: Storage, owner: str, file_id: str) -> FileObject:
    return file_object(await _owned_file(storage, owner, file_id))


async def file_content(storage: Storage, owner: str, file_id: str) -> bytes:
    await _owned_file(storage, owner, file_id)
    return await asyncio.to_thread(storage.read_file, file_id)


async def list_files(storage: Storage, owner: str, purpose: str | None, after: str | None, limit: int, order: str) -> FileList:
    files = await asyncio.to_thread(storage.list_files, owner, purpose)
    if order == "asc":
        files.reverse()
    page, more = _page([f.id for f in files], after, limit)
    by_id = {f.id: f for f in files}
    return FileList(data=[file_object(by_id[i]) for i in page], first_id=page[0] if page else None,
                    last_id=page[-1] if page else None, has_more=more)


async def delete_file(storage: Storage, owner: str, file_id: str) -> FileDeleted:
    if not await asyncio.to_thread(storage.delete_file, file_id, owner):
        raise NotFoundError(f"no file {file_id!r}", param="file_id", code="not_found")
    return FileDeleted(id=file_id, deleted=True)


def _page(ids: list[str], after: str | None, limit: int) -> tuple[list[str], bool]:
    """Cursor pagination: the ``limit`` ids after ``after``, and whether more follow."""
    limit = max(1, min(limit, MAX_PAGE))
    start = ids.index(after) + 1 if after in ids else 0
    return ids[start:start + limit], start + limit < len(ids)


async def batch_view(storage: Storage, record: dict) -> Batch:
    counts = await asyncio.to_thread(storage.line_counts, record["id"])
    return Batch(**record, request_counts=BatchRequestCounts(total=counts.total, completed=counts.completed, failed=counts.failed))


async def create_batch(
    storage: Storage, runner: BatchRunner, services: Services, settings: Settings, owner: str, req: BatchCreateRequest
) -> Batch:
    why = endpoint_served(services, req.endpoint)
    if why is not None:
        raise BadRequestError(why, param="endpoint", code="invalid_endpoint")
    source = await _owned_file(storage, owner, req.input_file_id)
    if source.purpose != "batch":
        raise BadRequestError(f"file {source.id!r} was uploaded with purpose {source.purpose!r}, not 'batch'",
                              param="input_file_id")
    if source.bytes > settings.batch_max_file_bytes:
        raise BadRequestError(f"the input file is {source.bytes} bytes; at most {settings.batch_max_file_bytes}",
                              param="input_file_id", code="file_too_large")
    content = await asyncio.to_thread(storage.read_file, source.id)
    why = await asyncio.to_thread(looks_like_jsonl, content)
    if why is not None:
        raise BadRequestError(why, param="input_file_id", code="invalid_file_format")
    lines = content.count(b"\n") + (0 if content.endswith(b"\n") else 1)
    if lines > settings.batch_max_lines:
        raise BadRequestError(f"the input file has {lines} lines; at most {settings.batch_max_lines} (batch_max_lines)",
                              param="input_file_id", code="too_many_lines")
    now = int(time.time())
    record = {
        "id": new_id("batch").replace("-", "_"),
        "object": "batch",
        "endpoint": req.endpoint,
        "input_file_id": source.id,
        "completion_window": req.completion_window,
        "status": "validating",
        "created_at": now,
        "expires_at": now + window_seconds(req.completion_window),
        "metadata": req.metadata,
    }
    await asyncio.to_thread(storage.add_batch, owner, record)
    runner.submit(record["id"])
    return await batch_view(storage, record)


async def _owned_batch(storage: Storage, owner: str, batch_id: str) -> dict:
    record = await asyncio.to_thread(storage.get_batch, batch_id, owner)
    if record is None:
        raise NotFoundError(f"no batch {batch_id!r}", param="batch_id", code="not_found")
    return record


async def get_batch(storage: Storage, owner: str, batch_id: str) -> Batch:
    return await batch_view(storage, await _owned_batch(storage, owner, batch_id))


async def list_batches(storage: Storage, owner: str, after: str | None, limit: int) -> BatchList:
    records = await asyncio.to_thread(storage.list_batches, owner)
    page, more = _page([r["id"] for r in records], after, limit)
    by_id = {r["id"]: r for r in records}
    data = [await batch_view(storage, by_id[i]) for i in page]
    return BatchList(data=data, first_id=page[0] if page else None, last_id=page[-1] if page else None, has_more=more)


async def cancel_batch(storage: Storage, runner: BatchRunner, owner: str, batch_id: str) -> Batch:
    await _owned_batch(storage, owner, batch_id)
    record = await asyncio.to_thread(
        storage.update_batch, batch_id, ("validating", "in_progress"), status="cancelling", cancelling_at=int(time.time())
    )
    if record is not None:
        runner.cancel(batch_id)
    return await get_batch(storage, owner, batch_id)
