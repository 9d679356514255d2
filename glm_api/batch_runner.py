"""Runs the Batch API's batches in the server: validate, run every line, write the output and
error files; resumes after a restart from the lines still pending.

A batch's life (OpenAI's statuses)::

    validating -> in_progress -> finalizing -> completed
         |             |-> cancelling -> cancelled     (POST /v1/batches/{id}/cancel)
         |             '-> expired                      (its completion window passed)
         '-> failed                                     (no input to run)

Interactive users come first. A line starts only on idle capacity: up to ``max_running``
lines when nothing else runs (plus a quarter more queued in the chat engine, so a slot a line
frees is taken in the engine's next step, not after the runner hears of it: the engine queues
interactive requests ahead of them), and no more than ``share`` chat lines, with nobody waiting,
while interactive requests are present. When a request waits for a
slot while batch lines hold more than their share, the newest line is stopped (its engine
request aborted; it stays pending and runs again first). Everything the runner learns comes
from the engines' public interface (``num_running``, ``num_waiting``) and its own counts,
never from an engine's internals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
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
    preempted: int = 0  # lines stopped to free a slot for an interactive request, run again later


class BatchRunner:
    def __init__(
        self, storage: Storage, services: Callable[[], Services | None], *, max_running: int, share: int,
        shutdown_grace: float = 0.0,
    ) -> None:
        """``max_running``: lines of all batches at once while the engines are otherwise idle;
        ``share``: chat lines kept while interactive requests are present."""
        self.storage = storage
        self._services = services
        self.max_running = max_running
        self.lookahead = max(1, max_running // 4)  # chat lines queued in the engine beyond its slots
        self.share = share
        self.shutdown_grace = shutdown_grace
        self.stats = BatchLineStats()
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancelled: set[str] = set()
        self._chat_inflight = 0  # chat lines of all batches between start and end
        self._resume: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        """Resume what a previous run left unfinished (once the models are loaded)."""
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
        queue = deque(await asyncio.to_thread(self.storage.pending_lines, batch_id))
        total = len(queue)
        self.stats.pending += total
        finished = [0]  # lines of this run recorded, for the pending gauge
        running: dict[asyncio.Task, tuple] = {}
        is_chat = record["endpoint"] != "/v1/embeddings"
        expires_at = record.get("expires_at")
        expired = False
        try:
            while queue or running:
                expired = expires_at is not None and time.time() >= expires_at
                if expired or batch_id in self._cancelled:
                    break  # the lines still running are aborted below and stay pending
                if self._stopping and not running:
                    break
                if queue and not self._stopping and self._may_start(is_chat):
                    item = queue.popleft()
                    task = asyncio.create_task(self._run_line(record, *item, finished))
                    running[task] = item
                    self._count(is_chat, +1)  # counted now, so the next _may_start sees it
                    task.add_done_callback(lambda _, chat=is_chat: self._count(chat, -1))
                    continue
                if is_chat and running and self._should_yield():
                    newest = next(reversed(running))
                    if not newest.done():
                        newest.cancel()  # an interactive request waits: give it this line's slot
                        self.stats.preempted += 1
                await asyncio.wait(set(running) or {asyncio.ensure_future(asyncio.sleep(GATE_POLL_SECONDS))},
                                   timeout=GATE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                for task in [t for t in running if t.done()]:
                    item = running.pop(task)
                    if task.cancelled():
                        queue.appendleft(item)  # preempted: it runs again, first
        finally:
            for task in list(running):
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            self.stats.pending -= total - finished[0]  # what stays pending leaves the gauge with this run
        if self._stopping:
            return record
        if batch_id in self._cancelled:
            return await asyncio.to_thread(self.storage.get_batch, batch_id)
        if expired:
            await asyncio.to_thread(self._expire, record)
            return await asyncio.to_thread(self.storage.get_batch, batch_id)
        return await self._set(batch_id, ("in_progress",), status="finalizing", finalizing_at=_now())

    def _chat_load(self) -> tuple[int, int]:
        """(requests waiting for a chat slot, chat requests that are not this runner's)."""
        services = self._services()
        chat = services.registry.chat if services is not None else None
        if chat is None:
            return 0, 0
        waiting = chat.num_waiting
        return waiting, max(0, chat.num_running + waiting - self._chat_inflight)

    def _may_start(self, is_chat: bool) -> bool:
        """Idle capacity only: a free slot (nobody waits), and with interactive requests present
        no more than the batch share."""
        if not is_chat:
            return self.stats.running < self.max_running
        waiting, others = self._chat_load()
        if others == 0:  # only batch lines: keep a few queued so freed slots refill at once
            return self.stats.running < self.max_running + self.lookahead
        return self.stats.running < self.max_running and waiting == 0 and self._chat_inflight < self.share

    def _should_yield(self) -> bool:
        """Someone waits for a chat slot while batch lines hold more than their share."""
        waiting, others = self._chat_load()
        return waiting > 0 and others > 0 and self._chat_inflight > self.share

    def _count(self, is_chat: bool, step: int) -> None:
        self.stats.running += step
        self._chat_inflight += step if is_chat else 0

    async def _run_line(self, record: dict, line: int, custom_id: str | None, request: str, finished: list[int]) -> None:
        services = self._services()
        request_id = f"{record['id']}-{line}"
        body = json.loads(request)["body"]
        while True:
            try:
                answer = await execute(services, record["endpoint"], body, request_id)
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
                state, result = COMPLETED, output_line(custom_id, request_id, answer)
            break
        if await asyncio.to_thread(self.storage.finish_line, record["id"], line, state, result):
            self.stats.finished[state] += 1
            self.stats.pending -= 1
            finished[0] += 1

    def _expire(self, record: dict) -> None:
        """Lines not run in the window go to the error file as ``batch_expired`` (as OpenAI's do)."""
        for line, custom_id, _ in self.storage.pending_lines(record["id"]):
            error = APIError("this line was not run before the batch expired", code="batch_expired")
            if self.storage.finish_line(record["id"], line, FAILED, error_line(line, custom_id, error)):
                self.stats.finished[FAILED] += 1
        fields = self._write_files(record["id"], record)  # the files first: "expired" means they are there
        self.storage.update_batch(record["id"], ("in_progress",), status="expired", expired_at=_now(), **fields)

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
        return fields

    async def _set(self, batch_id: str, only_from: tuple[str, ...], **fields) -> dict:
        """The record after the change, or as it is now if another step (a cancel) moved it first."""
        updated = await asyncio.to_thread(self.storage.update_batch, batch_id, only_from, **fields)
        return updated or await asyncio.to_thread(self.storage.get_batch, batch_id)


def _now() -> int:
    return int(time.time())
