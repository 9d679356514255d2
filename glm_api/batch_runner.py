"""Runs the Batch API's batches in the server: validate, run every line, write the output and
error files; resumes after a restart from the lines still pending.

A batch's life (OpenAI's statuses)::

    validating -> in_progress -> finalizing -> completed
         |             |-> cancelling -> cancelled     (POST /v1/batches/{id}/cancel)
         |             '-> expired                      (its completion window passed)
         '-> failed                                     (no input to run)

Interactive users come first: batch lines hold at most ``batch_max_running`` engine slots in
all, and a chat line starts only while the chat engine has no request waiting for a slot
(interactive or batch), so an interactive request never queues behind more than the lines
already running. Everything the runner learns goes through the engines' public interface
(``num_waiting``) and the serving layer, never into an engine's internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from glm_api.errors import APIError, InternalError
from glm_api.serving.batch_lines import RetryLater, error_line, execute, output_line, parse_lines
from glm_api.state import Services
from glm_api.storage import COMPLETED, FAILED, PENDING, Storage

log = logging.getLogger(__name__)

#: How often a line that may not start yet looks again (an interactive request waits, or the
#: engine said 429).
GATE_POLL_SECONDS = 0.02
RETRY_SECONDS = 0.5


def window_seconds(window: str) -> int:
    """``"24h"`` -> 86400 (also ``N s``, ``N m``)."""
    return int(window[:-1]) * {"s": 1, "m": 60, "h": 3600}[window[-1]]


@dataclass
class BatchLineStats:
    """Figures for /metrics, since the process started (``pending``: of the batches loaded)."""

    finished: Counter = field(default_factory=Counter)  # by final state
    running: int = 0
    pending: int = 0
    retried: int = 0  # lines the engine refused for now (429 / unavailable), run again later


class BatchRunner:
    def __init__(
        self, storage: Storage, services: Callable[[], Services | None], *, max_running: int, shutdown_grace: float = 0.0
    ) -> None:
        self.storage = storage
        self._services = services
        self.max_running = max_running
        self.shutdown_grace = shutdown_grace
        self.stats = BatchLineStats()
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancelled: set[str] = set()
        self._slots: asyncio.Semaphore | None = None
        self._resume: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        """Resume what a previous run left unfinished (once the models are loaded)."""
        self._slots = asyncio.Semaphore(self.max_running)
        self._resume = asyncio.create_task(self._resume_active())

    async def _resume_active(self) -> None:
        while self._services() is None:
            await asyncio.sleep(0.2)
        for record in await asyncio.to_thread(self.storage.active_batches):
            log.info("resuming batch %s (%s)", record["id"], record["status"])
            self.submit(record["id"])

    def submit(self, batch_id: str) -> None:
        if self._stopping or batch_id in self._tasks:
            return
        task = asyncio.create_task(self._run(batch_id), name=f"batch {batch_id}")
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    def cancel(self, batch_id: str) -> None:
        """Stop starting lines of ``batch_id``; running ones are aborted (they stay pending),
        then it is finalised as ``cancelled``."""
        self._cancelled.add(batch_id)
        if batch_id not in self._tasks:
            self.submit(batch_id)

    async def stop(self) -> None:
        """Stop starting lines; give the running ones the grace period, then abort them (they
        stay pending and run after the next start)."""
        self._stopping = True
        if self._resume is not None:
            self._resume.cancel()
        tasks = list(self._tasks.values())
        if tasks and self.shutdown_grace > 0:
            await asyncio.wait(tasks, timeout=self.shutdown_grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # One batch ----------------------------------------------------------------------------
    async def _run(self, batch_id: str) -> None:
        try:
            record = await asyncio.to_thread(self.storage.get_batch, batch_id)
            if record is None:
                return
            if record["status"] == "validating":
                record = await self._validate(record)
            if record["status"] == "in_progress":
                record = await self._run_lines(record)
            if record["status"] in ("finalizing", "cancelling"):
                await asyncio.to_thread(self._finalize, record)
        except asyncio.CancelledError:
            raise
        except Exception:  # a storage failure: log it, the batch resumes at the next start
            log.exception("batch %s stopped", batch_id)
        finally:
            self._cancelled.discard(batch_id)

    async def _validate(self, record: dict) -> dict:
        batch_id = record["id"]
        try:
            content = await asyncio.to_thread(self.storage.read_file, record["input_file_id"])
            parsed = await asyncio.to_thread(parse_lines, content, record["endpoint"])
        except (OSError, UnicodeDecodeError) as exc:
            parsed, reason = [], f"the input file cannot be read: {type(exc).__name__}"
        else:
            reason = "the input file has no lines" if not parsed else None
        if reason is not None:
            errors = {"object": "list", "data": [{"code": "invalid_input_file", "message": reason}]}
            return await self._set(batch_id, ("validating",), status="failed", failed_at=_now(), errors=errors)
        rows = []
        for p in parsed:
            if p.error is None:
                rows.append((p.line, p.custom_id, PENDING, json.dumps(p.request), None))
            else:
                rows.append((p.line, p.custom_id, FAILED, None, json.dumps(error_line(p.line, p.custom_id, p.error))))
        await asyncio.to_thread(self.storage.add_lines, batch_id, rows)
        self.stats.finished[FAILED] += sum(1 for p in parsed if p.error is not None)
        return await self._set(batch_id, ("validating",), status="in_progress", in_progress_at=_now())

    async def _run_lines(self, record: dict) -> dict:
        batch_id = record["id"]
        pending = await asyncio.to_thread(self.storage.pending_lines, batch_id)
        self.stats.pending += len(pending)
        finished = [0]  # lines of this run recorded, for the pending gauge
        running: set[asyncio.Task] = set()
        expired = False
        try:
            for line, custom_id, request in pending:
                assert self._slots is not None
                await self._slots.acquire()
                if batch_id in self._cancelled or self._stopping:
                    self._slots.release()
                    break
                if record.get("expires_at") is not None and time.time() >= record["expires_at"]:
                    self._slots.release()
                    expired = True
                    break
                task = asyncio.create_task(self._run_line(record, line, custom_id, json.loads(request), finished))
                running.add(task)
                task.add_done_callback(running.discard)
            while running and batch_id not in self._cancelled and not expired:
                await asyncio.wait(set(running), timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
                expired = record.get("expires_at") is not None and time.time() >= record["expires_at"]
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self.stats.pending -= len(pending) - finished[0]
        if self._stopping:
            return record
        if batch_id in self._cancelled:
            return await asyncio.to_thread(self.storage.get_batch, batch_id)
        if expired:
            await asyncio.to_thread(self._expire, record)
            return await asyncio.to_thread(self.storage.get_batch, batch_id)
        return await self._set(batch_id, ("in_progress",), status="finalizing", finalizing_at=_now())

    async def _run_line(self, record: dict, line: int, custom_id: str | None, request: dict, finished: list[int]) -> None:
        assert self._slots is not None
        services = self._services()
        request_id = f"{record['id']}-{line}"
        self.stats.running += 1
        try:
            while True:
                if record["endpoint"] != "/v1/embeddings" and services.registry.chat is not None:
                    while services.registry.chat.num_waiting > 0:  # someone waits for a slot: let them have it
                        await asyncio.sleep(GATE_POLL_SECONDS)
                try:
                    body = await execute(services, record["endpoint"], request["body"], request_id)
                except RetryLater:
                    self.stats.retried += 1
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                except APIError as exc:
                    state, result = FAILED, error_line(line, custom_id, exc, request_id)
                except Exception:  # a bug, not the line's fault: the line says so, the rest run
                    log.exception("batch %s line %d", record["id"], line)
                    state, result = FAILED, error_line(line, custom_id, InternalError("internal error"), request_id)
                else:
                    state, result = COMPLETED, output_line(custom_id, request_id, body)
                break
            if await asyncio.to_thread(self.storage.finish_line, record["id"], line, state, result):
                self.stats.finished[state] += 1
                self.stats.pending -= 1
                finished[0] += 1
        finally:
            self.stats.running -= 1
            self._slots.release()

    def _expire(self, record: dict) -> None:
        """Lines not run in the window go to the error file as ``batch_expired`` (as OpenAI's do)."""
        for line, custom_id, _ in self.storage.pending_lines(record["id"]):
            error = APIError("this line was not run before the batch expired", code="batch_expired")
            if self.storage.finish_line(record["id"], line, FAILED, error_line(line, custom_id, error)):
                self.stats.finished[FAILED] += 1
        self.storage.update_batch(record["id"], ("in_progress",), status="expired", expired_at=_now())
        self._write_files(record["id"], record)

    def _finalize(self, record: dict) -> None:
        """Write the output and error files (again, if a crash cut it short: same file ids)."""
        batch_id = record["id"]
        fields = self._write_files(batch_id, record)
        if record["status"] == "cancelling":
            self.storage.update_batch(batch_id, ("cancelling",), status="cancelled", cancelled_at=_now(), **fields)
        else:
            self.storage.update_batch(batch_id, ("finalizing",), status="completed", completed_at=_now(), **fields)

    def _write_files(self, batch_id: str, record: dict) -> dict:
        owner = self.storage.batch_owner(batch_id)
        fields: dict = {}
        suffix = batch_id.removeprefix("batch_")
        for state, key, name in ((COMPLETED, "output_file_id", "output"), (FAILED, "error_file_id", "error")):
            lines = list(self.storage.results(batch_id, state))
            if not lines:
                continue
            content = ("\n".join(lines) + "\n").encode()
            stored = self.storage.add_file(
                owner, "batch_output", f"{batch_id}_{name}.jsonl", content, file_id=f"file-{name}-{suffix}"
            )
            fields[key] = stored.id
        if fields:
            self.storage.update_batch(batch_id, None, **fields)
        return fields

    async def _set(self, batch_id: str, only_from: tuple[str, ...], **fields) -> dict:
        """The record after the change, or as it is now if another step (a cancel) moved it first."""
        updated = await asyncio.to_thread(self.storage.update_batch, batch_id, only_from, **fields)
        return updated or await asyncio.to_thread(self.storage.get_batch, batch_id)


def _now() -> int:
    return int(time.time())
