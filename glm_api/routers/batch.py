"""The OpenAI Files and Batch API routes: parse, call :mod:`glm_api.serving.batches`, return."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from glm_api.deps import AppStateDep, BatchOwnerDep, BatchRunnerDep, BatchStorageDep, ServicesDep
from glm_api.protocol.batch import PURPOSES, Batch, BatchCreateRequest, BatchList, FileDeleted, FileList, FileObject
from glm_api.protocol.common import ERROR_RESPONSES
from glm_api.serving import batches

router = APIRouter(prefix="/v1", tags=["OpenAI Batch API"], responses=ERROR_RESPONSES)


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file", "purpose"],
            "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": list(PURPOSES)}},
        }}},
    }
}


@router.post("/files", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, state: AppStateDep, storage: BatchStorageDep, owner: BatchOwnerDep) -> FileObject:
    body = await request.body()
    return await batches.upload_file(storage, state.settings, owner, request.headers.get("content-type", ""), body)


@router.get("/files", response_model=FileList)
async def list_files(
    storage: BatchStorageDep, owner: BatchOwnerDep, purpose: str | None = None, after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, order: Literal["asc", "desc"] = "desc",
) -> FileList:
    return await batches.list_files(storage, owner, purpose, after, limit, order)


@router.get("/files/{file_id}", response_model=FileObject)
async def get_file(file_id: str, storage: BatchStorageDep, owner: BatchOwnerDep) -> FileObject:
    return await batches.get_file(storage, owner, file_id)


@router.get("/files/{file_id}/content", response_class=Response)
async def file_content(file_id: str, storage: BatchStorageDep, owner: BatchOwnerDep) -> Response:
    return Response(await batches.file_content(storage, owner, file_id), media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, storage: BatchStorageDep, owner: BatchOwnerDep) -> FileDeleted:
    return await batches.delete_file(storage, owner, file_id)


@router.post("/batches", response_model=Batch)
async def create_batch(
    body: BatchCreateRequest, state: AppStateDep, services: ServicesDep, storage: BatchStorageDep, runner: BatchRunnerDep,
    owner: BatchOwnerDep,
) -> Batch:
    return await batches.create_batch(storage, runner, services, state.settings, owner, body)


@router.get("/batches", response_model=BatchList)
async def list_batches(
    storage: BatchStorageDep, owner: BatchOwnerDep, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> BatchList:
    return await batches.list_batches(storage, owner, after, limit)


@router.get("/batches/{batch_id}", response_model=Batch)
async def get_batch(batch_id: str, storage: BatchStorageDep, owner: BatchOwnerDep) -> Batch:
    return await batches.get_batch(storage, owner, batch_id)


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(batch_id: str, storage: BatchStorageDep, runner: BatchRunnerDep, owner: BatchOwnerDep) -> Batch:
    return await batches.cancel_batch(storage, runner, owner, batch_id)
