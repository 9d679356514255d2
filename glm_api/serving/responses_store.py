"""Stored responses (``store: true``) for the Responses API: the SQLite store of
:mod:`glm_api.response_storage`, opened on first use, every call off the event loop.

A stored response belongs to its ``owner`` (the digest of the API key that created it, ``""``
with keys off, as for batches): another owner's is a 404, as if it did not exist.
"""

from __future__ import annotations

import asyncio
from typing import Any

from glm_api.config import Settings
from glm_api.errors import NotFoundError
from glm_api.response_storage import ResponseStorage


class ResponseStore:
    """Opened on first use, or at start-up when a previous run left a database, so that a
    server that never stores a response writes nothing."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = asyncio.Lock()
        self._storage: ResponseStorage | None = None

    async def start(self) -> None:
        if self.settings.responses_db_path().exists():
            await self._open()

    async def _open(self) -> ResponseStorage:
        async with self._lock:
            if self._storage is None:
                self._storage = await asyncio.to_thread(
                    ResponseStorage, self.settings.responses_db_path(), self.settings.responses_max_bytes,
                    self.settings.responses_max_age_hours * 3600,
                )
            return self._storage

    async def stop(self) -> None:
        if self._storage is not None:
            await asyncio.to_thread(self._storage.close)

    async def add(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        storage = await self._open()
        await asyncio.to_thread(storage.add, owner, response, input_items)

    async def get(self, owner: str, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(response, input items)``; a 404 when absent, evicted or another owner's."""
        if self._storage is None and not self.settings.responses_db_path().exists():
            raise _not_found(response_id)  # nothing was ever stored: do not create the database
        storage = await self._open()
        found = await asyncio.to_thread(storage.get, response_id, owner)
        if found is None:
            raise _not_found(response_id)
        return found

    async def delete(self, owner: str, response_id: str) -> None:
        if self._storage is None and not self.settings.responses_db_path().exists():
            raise _not_found(response_id)
        storage = await self._open()
        if not await asyncio.to_thread(storage.delete, response_id, owner):
            raise _not_found(response_id)


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"No response found with id {response_id!r}.", param="response_id", code="not_found")
