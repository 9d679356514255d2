"""FastAPI dependency aliases: routes declare what they need, nothing is global.

The dependencies are ``async def`` although they never await: FastAPI runs a plain ``def``
dependency in its thread pool, a thread hop per request for a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Response

from glm_api.batch_runner import BatchRunner
from glm_api.errors import EngineUnavailableError
from glm_api.security import request_api_key
from glm_api.serving import batches
from glm_api.serving.responses_store import ResponseStore
from glm_api.storage import Storage
from glm_api.state import AppState, Services

T = TypeVar("T")

log = logging.getLogger(__name__)


async def get_app_state(request: Request) -> AppState:
    return request.app.state.glm


async def get_services(request: Request) -> Services:
    state: AppState = request.app.state.glm
    if state.services is None:
        detail = f"model loading failed: {state.load_error}" if state.load_error else "models are still loading"
        raise EngineUnavailableError(detail)
    return state.services


async def get_request_id(request: Request) -> str:
    return request.state.request_id


AppStateDep = Annotated[AppState, Depends(get_app_state)]
ServicesDep = Annotated[Services, Depends(get_services)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


# The Batch API's store and runner (opened on first use) and the owner of what a request makes.
async def get_batch_storage(state: AppStateDep) -> Storage:
    storage, _ = await state.batches.open()
    return storage


async def get_batch_runner(state: AppStateDep) -> BatchRunner:
    _, runner = await state.batches.open()
    return runner


async def get_batch_owner(request: Request, state: AppStateDep) -> str:
    """With API keys on, what a key makes is that key's alone."""
    keys_on = bool(state.settings.api_keys or state.settings.api_key_file)
    return batches.owner_of(request_api_key(request.scope)) if keys_on else ""


BatchStorageDep = Annotated[Storage, Depends(get_batch_storage)]
BatchRunnerDep = Annotated[BatchRunner, Depends(get_batch_runner)]
BatchOwnerDep = Annotated[str, Depends(get_batch_owner)]


async def get_response_store(state: AppStateDep) -> ResponseStore:
    return state.responses


ResponseStoreDep = Annotated[ResponseStore, Depends(get_response_store)]
#: Stored responses belong to the key that made them, as batches do.
OwnerDep = BatchOwnerDep


#: nginx's "client closed request": what the access log and the metrics count for a request
#: whose client left before its answer (never a 5xx: the server did nothing wrong).
CLIENT_CLOSED_REQUEST = 499


async def until_disconnect(request: Request, work: Awaitable[T], poll_seconds: float = 0.25) -> T | Response:
    """Await ``work``, cancelling it if the client goes away first (frees its engine slot).

    A client that left gets a 499 response nobody reads (the server drops what is sent on a
    closed connection), and one info line: raising CancelledError instead made uvicorn log a
    traceback and count a 500."""
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_seconds)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.wait({task})  # its cleanup (the engine abort) has run
                if not task.cancelled():
                    task.exception()  # whatever it ended with, nobody is there to hear it
                log.info(
                    "request %s cancelled: the client disconnected after %.1fs",
                    request.state.request_id, time.monotonic() - started,
                )
                return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if not task.done():
            task.cancel()
