"""The Responses API's SQLite store: kept per owner, across reopening, evicted oldest first by
total size and by age."""

from __future__ import annotations

import sqlite3
import time

from glm_api.response_storage import ResponseStorage

ITEMS = [{"id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]


def response(i: int, text: str = "") -> dict:
    return {"id": f"resp_{i}", "object": "response", "output": [{"text": text}]}


def test_kept_per_owner_and_across_reopening(tmp_path):
    path = tmp_path / "sub" / "r.sqlite3"
    store = ResponseStorage(path, max_bytes=10**6, max_age_seconds=3600)
    store.add("alice", response(1, "é"), ITEMS)
    assert store.get("resp_1", "bob") is None
    assert not store.delete("resp_1", "bob")
    store.close()
    store = ResponseStorage(path, max_bytes=10**6, max_age_seconds=3600)
    assert store.get("resp_1", "alice") == (response(1, "é"), ITEMS)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.delete("resp_1", "alice") and store.get("resp_1", "alice") is None
    store.close()


def test_the_oldest_go_when_the_total_size_is_over_the_limit(tmp_path):
    one = len(str(response(0, "x" * 100)))  # about one row's JSON
    store = ResponseStorage(tmp_path / "r.sqlite3", max_bytes=3 * one + 2 * len(str(ITEMS)) + 300,
                            max_age_seconds=3600)
    for i in range(6):
        store.add("o", response(i, "x" * 100), ITEMS)
    kept = [i for i in range(6) if store.get(f"resp_{i}", "o") is not None]
    count, size = store.stats()
    assert kept == list(range(6 - len(kept), 6)) and 1 <= len(kept) < 6 and count == len(kept)
    assert size <= store.max_bytes
    store.close()


def test_responses_older_than_the_age_limit_go(tmp_path):
    store = ResponseStorage(tmp_path / "r.sqlite3", max_bytes=10**6, max_age_seconds=0.2)
    store.add("o", response(1), ITEMS)
    time.sleep(0.3)
    store.add("o", response(2), ITEMS)  # each write evicts what has aged out
    assert store.get("resp_1", "o") is None and store.get("resp_2", "o") is not None
    store.close()
