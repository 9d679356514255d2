"""What the Batch API keeps: files, batches and every line's state, in one SQLite database (WAL)
plus the files' bytes under the data directory.

    <data_dir>/glm-api.sqlite3      files, batches, batch_lines
    <data_dir>/files/<file id>      uploaded inputs and generated outputs, as written

Every method is blocking (SQLite, the disk): the serving layer calls them in a thread
(``asyncio.to_thread``), the offline command directly. One connection is shared behind a lock,
so calls from several threads never interleave a transaction. A finished line is one committed
``UPDATE ... WHERE state = 'pending'``: a crash loses at most the lines still running, and a
line can never be recorded twice. Nothing below serving imports this module.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Line states. ``pending`` lines are run (again, after a restart); the other two are final.
PENDING, COMPLETED, FAILED = "pending", "completed", "failed"
#: Batch statuses in which the runner still has work (resumed at start-up).
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
FINAL_STATUSES = ("completed", "failed", "cancelled", "expired")
DB_NAME = "glm-api.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT, state TEXT NOT NULL,
    request TEXT, result TEXT,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX IF NOT EXISTS batch_lines_by_state ON batch_lines (batch_id, state);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class StoredFile:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int


@dataclass
class LineCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    pending: int = 0


class SQLiteDatabase:
    """One SQLite database in WAL mode behind a lock (blocking: call it from a thread)."""

    def __init__(self, path: Path, schema: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
        self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _write(self, statements: list[tuple[str, tuple]]) -> int:
        """Run statements in one transaction; the number of rows the last one changed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = 0
                for sql, args in statements:
                    changed = self._db.execute(sql, args).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return changed


class Storage(SQLiteDatabase):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.data_dir / DB_NAME, SCHEMA)

    # Files ------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, owner: str, purpose: str, filename: str, content: bytes, file_id: str | None = None) -> StoredFile:
        """Write the bytes (synced), then the row: a row never points at a missing file."""
        record = StoredFile(file_id or new_id("file"), owner, purpose, filename, len(content), int(time.time()))
        path = self.file_path(record.id)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._write([(
            "INSERT OR REPLACE INTO files (id, owner, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (record.id, owner, purpose, filename, record.bytes, record.created_at),
        )])
        return record

    def get_file(self, file_id: str, owner: str) -> StoredFile | None:
        rows = self._query("SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner))
        return StoredFile(*rows[0]) if rows else None

    def list_files(self, owner: str, purpose: str | None = None) -> list[StoredFile]:
        """Newest first."""
        sql, args = "SELECT * FROM files WHERE owner = ?", [owner]
        if purpose:
            sql, args = sql + " AND purpose = ?", [*args, purpose]
        return [StoredFile(*row) for row in self._query(sql + " ORDER BY created_at DESC, rowid DESC", args)]

    def read_file(self, file_id: str) -> bytes:
        return self.file_path(file_id).read_bytes()

    def delete_file(self, file_id: str, owner: str) -> bool:
        deleted = self._write([("DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner))]) > 0
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return deleted

    # Batches ----------------------------------------------------------------------------
    def add_batch(self, owner: str, record: dict[str, Any]) -> None:
        self._write([(
            "INSERT INTO batches (id, owner, created_at, status, record) VALUES (?, ?, ?, ?, ?)",
            (record["id"], owner, record["created_at"], record["status"], json.dumps(record)),
        )])

    def get_batch(self, batch_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The batch's record (OpenAI's fields, without request_counts); ``owner`` None: anyone's."""
        if owner is None:
            rows = self._query("SELECT record FROM batches WHERE id = ?", (batch_id,))
        else:
            rows = self._query("SELECT record FROM batches WHERE id = ? AND owner = ?", (batch_id, owner))
        return json.loads(rows[0][0]) if rows else None

    def batch_owner(self, batch_id: str) -> str:
        return self._query("SELECT owner FROM batches WHERE id = ?", (batch_id,))[0][0]

    def list_batches(self, owner: str) -> list[dict[str, Any]]:
        """Newest first."""
        rows = self._query("SELECT record FROM batches WHERE owner = ? ORDER BY created_at DESC, rowid DESC", (owner,))
        return [json.loads(row[0]) for row in rows]

    def active_batches(self) -> list[dict[str, Any]]:
        """Batches a previous run left unfinished, oldest first."""
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        rows = self._query(f"SELECT record FROM batches WHERE status IN ({marks}) ORDER BY created_at, rowid", ACTIVE_STATUSES)
        return [json.loads(row[0]) for row in rows]

    def update_batch(self, batch_id: str, only_from: tuple[str, ...] | None = None, **fields: Any) -> dict[str, Any] | None:
        """Set fields of a batch's record; with ``only_from``, only while its status is one of
        those (a compare-and-set, so a cancel and the runner's finish cannot both win).
        The updated record, or None when nothing changed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute("SELECT record FROM batches WHERE id = ?", (batch_id,)).fetchall()
                if not rows:
                    self._db.execute("ROLLBACK")
                    return None
                record = json.loads(rows[0][0])
                if only_from is not None and record["status"] not in only_from:
                    self._db.execute("ROLLBACK")
                    return None
                record.update(fields)
                self._db.execute(
                    "UPDATE batches SET status = ?, record = ? WHERE id = ?", (record["status"], json.dumps(record), batch_id)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return record

    # Lines ------------------------------------------------------------------------------
    def add_lines(self, batch_id: str, lines: Iterable[tuple[int, str | None, str, str | None, str | None]]) -> None:
        """``(line, custom_id, state, request JSON, result JSON)`` rows; lines already there are
        kept (validation that a crash cut short is simply run again)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO batch_lines (batch_id, line, custom_id, state, request, result) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    ((batch_id, *row) for row in lines),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def pending_lines(self, batch_id: str) -> list[tuple[int, str | None, str]]:
        """``(line, custom_id, request JSON)`` of the lines still to run, in file order."""
        return self._query(
            "SELECT line, custom_id, request FROM batch_lines WHERE batch_id = ? AND state = ? ORDER BY line",
            (batch_id, PENDING),
        )

    def finish_line(self, batch_id: str, line: int, state: str, result: dict[str, Any]) -> bool:
        """Record a line's outcome once: False if it was already final (then nothing changes)."""
        return self._write([(
            "UPDATE batch_lines SET state = ?, result = ?, request = NULL WHERE batch_id = ? AND line = ? AND state = ?",
            (state, json.dumps(result, ensure_ascii=False), batch_id, line, PENDING),
        )]) > 0

    def line_counts(self, batch_id: str) -> LineCounts:
        counts = LineCounts()
        for state, n in self._query("SELECT state, COUNT(*) FROM batch_lines WHERE batch_id = ? GROUP BY state", (batch_id,)):
            setattr(counts, state, n)
            counts.total += n
        return counts

    def results(self, batch_id: str, state: str) -> Iterator[str]:
        """The JSON results of the lines in ``state``, in input order."""
        rows = self._query(
            "SELECT result FROM batch_lines WHERE batch_id = ? AND state = ? ORDER BY line", (batch_id, state)
        )
        return (row[0] for row in rows)

    def lines_by_state(self) -> dict[str, int]:
        """Lines of every batch by state (for /metrics)."""
        return dict(self._query("SELECT state, COUNT(*) FROM batch_lines GROUP BY state"))
