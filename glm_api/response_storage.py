"""What the Responses API keeps with ``store: true``: each response and the items it was
generated from, in one SQLite database (WAL), by default ``<data_dir>/responses.sqlite3``.

One row per response: the response object as returned (JSON) and its input items (JSON: the
items of earlier turns reached through ``previous_response_id``, then this request's own), so
that a later ``previous_response_id`` continues from ``input_items + output`` even after the
earlier responses are gone. Limits: rows older than ``max_age_seconds`` go, then the oldest
until the rows' JSON fits in ``max_bytes``; both are applied in the transaction that adds a row.

Every method is blocking: the serving layer calls them in a thread. Nothing below serving
imports this module.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from glm_api.storage import SQLiteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, bytes INTEGER NOT NULL,
    response TEXT NOT NULL, input_items TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


class ResponseStorage(SQLiteDatabase):
    def __init__(self, path: Path, max_bytes: int, max_age_seconds: float) -> None:
        super().__init__(path, SCHEMA)
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds

    def add(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """Keep a response (replacing one of the same id), then evict what the limits exclude."""
        response_json = json.dumps(response, ensure_ascii=False)
        items_json = json.dumps(input_items, ensure_ascii=False)
        size = len(response_json.encode()) + len(items_json.encode())
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO responses (id, owner, created_at, bytes, response, input_items) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (response["id"], owner, now, size, response_json, items_json),
                )
                self._evict(now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _evict(self, now: float) -> None:
        """Inside the caller's transaction: too old first, then oldest first down to max_bytes."""
        self._db.execute("DELETE FROM responses WHERE created_at < ?", (now - self.max_age_seconds,))
        total = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM responses").fetchone()[0]
        if total <= self.max_bytes:
            return
        doomed = []
        for response_id, size in self._db.execute("SELECT id, bytes FROM responses ORDER BY created_at, rowid"):
            if total <= self.max_bytes:
                break
            doomed.append((response_id,))
            total -= size
        self._db.executemany("DELETE FROM responses WHERE id = ?", doomed)

    def get(self, response_id: str, owner: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """``(response, input items)``, or None when absent or another owner's."""
        rows = self._query("SELECT response, input_items FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        if not rows:
            return None
        return json.loads(rows[0][0]), json.loads(rows[0][1])

    def delete(self, response_id: str, owner: str) -> bool:
        return self._write([("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))]) > 0

    def stats(self) -> tuple[int, int]:
        """``(responses kept, bytes of their JSON)``."""
        count, size = self._query("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM responses")[0]
        return count, size
