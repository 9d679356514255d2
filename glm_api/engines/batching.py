"""The dynamic batching queue shared by the encoder engines (embeddings, rerank), after
infinity's batch handler.

Requests put their items (texts, or query/document pairs) on one queue; a worker thread takes
up to ``batch_size`` items from however many requests are waiting (after a short wait for more
to arrive), tokenises them once, sorts them by length so little compute goes to padding, runs
the model in as few passes as padding makes worth it, and hands each request its rows back
through an asyncio future. A request larger than a batch is spread over several.

A subclass says only how its items become model rows: :meth:`_prepare` (tokenise),
:meth:`_token_lengths`, :meth:`_forward` (one pass over some rows) and :meth:`_result` (the
rows of one request as what its caller gets back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from glm_api.engines.stats import EmbeddingEngineStats
from glm_api.engines.engine_thread import EngineThread
from glm_api.passing_thread import run_in_passing_thread
from glm_api.errors import EngineUnavailableError, InternalError, RateLimitError

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

#: The longest a batch waits for more items, in units of ``batch_wait``.
MAX_WAIT_FACTOR = 10

#: Per forward pass overhead in padded tokens (a pass of n rows padded to L tokens costs about
#: ``OVERHEAD + n * L``): measured for MiniLM on 2 CPU cores as ~5.7 ms fixed (reading the
#: weights) + ~0.09 ms per token.
FORWARD_OVERHEAD_TOKENS = 64


@dataclass
class _Job(Generic[Item]):
    items: list[Item]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    rows: list[Any] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    remaining: int = 0
    failed: bool = False

    def __post_init__(self) -> None:
        self.rows = [None] * len(self.items)
        self.counts = [0] * len(self.items)
        self.remaining = len(self.items)


class BatchingEngine(EngineThread, Generic[Item, Result]):
    """One model behind one queue of items, run in dynamic batches by a worker thread."""

    _kind = "encoder engine"
    _items_noun = "items"  # for the 429 message: "N texts are waiting"
    _work_verb = "processed"

    def __init__(self, model_name: str, *, batch_size: int, batch_wait_ms: float, max_queued: int) -> None:
        super().__init__(model_name)
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_queued = max_queued
        self.stats = EmbeddingEngineStats()
        self._queue: deque[tuple[_Job, int]] = deque()  # (job, index of one item)

    # -- what a subclass defines (called on the worker thread) ------------------------------

    def _prepare(self, items: list[Item]) -> dict[str, Any]:
        """Tokenised, padded features of ``items`` (one row each)."""
        raise NotImplementedError

    def _token_lengths(self, features: dict[str, Any]) -> list[int]:
        raise NotImplementedError

    def _forward(self, features: dict[str, Any], rows: list[int]) -> Any:
        """One forward pass over some rows of the features: an indexable of per-row outputs."""
        raise NotImplementedError

    def _result(self, rows: list[Any], counts: list[int]) -> Result:
        """What a request gets back: its rows in order and the tokens each took."""
        raise NotImplementedError

    def _empty_result(self) -> Result:
        return self._result([], [])

    # -- the caller's side -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    async def _submit(self, items: list[Item]) -> Result:
        self.check_health()
        if not items:
            return self._empty_result()
        loop = asyncio.get_running_loop()
        job = _Job(items=list(items), loop=loop, future=loop.create_future())
        with self._cv:
            if len(self._queue) + len(items) > self.max_queued:
                self.stats.rejected += 1
                raise RateLimitError(
                    f"the server is busy: {len(self._queue)} {self._items_noun} are waiting to be "
                    f"{self._work_verb}; retry shortly"
                )
            self._queue.extend((job, i) for i in range(len(items)))
            self.stats.requests += 1
            self._cv.notify()
        try:
            return await job.future
        finally:
            # Cancelled (the task's cancel also cancels the future): its items leave the queue
            # now and free their places, rather than when the worker reaches them.
            if job.future.cancelled() or not job.future.done():
                job.failed = True
                with self._cv:
                    self._queue = deque(item for item in self._queue if item[0] is not job)

    # -- worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                try:
                    # Each batch in a thread that ends with it: between batches this engine holds
                    # no OpenMP team to slow the chat engine's (glm_api/passing_thread.py).
                    run_in_passing_thread(self._run_inference, batch, name=f"{self._kind}-batch")
                except Exception:  # a bug in one batch must not stop the engine or strand its callers
                    log.exception("%s batch of %d failed", self._kind, len(batch))
                    self._resolve_all(self._fail(batch))
        except BaseException as exc:
            self._dead = f"{type(exc).__name__}: {exc}"
            log.exception("%s %s died", self._kind, self.model_name)
        finally:
            with self._cv:
                pending, self._queue = list(self._queue), deque()
            for job in {id(j): j for j, _ in pending}.values():
                self._resolve_all([(job, EngineUnavailableError(f"the {self._kind} is shutting down"))])

    def _next_batch(self) -> list[tuple[_Job, int]] | None:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            # Concurrent single-item requests reach the queue one by one, as fast as the event
            # loop parses them (~1 ms each on 2 cores). Waiting a fixed 2 ms caught a few of
            # them; waiting while they keep coming (each arrival grants another `batch_wait`,
            # up to MAX_WAIT_FACTOR times it in all) gathers the whole wave into one pass, and
            # still costs a lone request only `batch_wait`.
            now = time.monotonic()
            hard_deadline = now + self.batch_wait * MAX_WAIT_FACTOR
            deadline, seen = now + self.batch_wait, len(self._queue)
            while len(self._queue) < self.batch_size and (left := min(deadline, hard_deadline) - time.monotonic()) > 0:
                self._cv.wait(left)
                if len(self._queue) > seen:
                    deadline, seen = time.monotonic() + self.batch_wait, len(self._queue)
            batch = []
            while self._queue and len(batch) < self.batch_size:
                job, index = self._queue.popleft()
                if not job.failed:
                    batch.append((job, index))
            return batch

    def _run_inference(self, batch: list[tuple[_Job, int]]) -> None:
        with torch.inference_mode():  # per thread: the passing thread's own
            self._run(batch)

    def _run(self, batch: list[tuple[_Job, int]]) -> None:
        """Run what was gathered: tokenised once, sorted by length, in as many passes as
        padding makes worth it.

        The requests are answered together after the last pass: answering after each pass was
        measured slower (the replies and the clients' next requests then cut the following
        waves into small batches).
        """
        try:
            features = self._prepare([job.items[i] for job, i in batch])
            lengths = self._token_lengths(features)
        except Exception:  # fail these requests, keep serving
            log.exception("tokenising %d %s failed", len(batch), self._items_noun)
            self._resolve_all(self._fail(batch))
            return
        order = sorted(range(len(batch)), key=lengths.__getitem__)
        done: list[tuple[_Job, Any]] = []
        for start, end in split_by_length([lengths[i] for i in order]):
            rows = order[start:end]
            done += self._run_pass([batch[i] for i in rows], features, rows, [lengths[i] for i in rows])
        self._resolve_all(done)

    def _run_pass(
        self, part: list[tuple[_Job, int]], features: dict, rows: list[int], counts: list[int]
    ) -> list[tuple[_Job, Any]]:
        """One forward pass over some rows of the batch; returns the requests it completed (or failed)."""
        try:
            outputs = self._forward(features, rows)
        except Exception:  # fail the requests of this pass, keep serving
            log.exception("%s pass of %d failed", self._kind, len(part))
            return self._fail(part)
        self.stats.batches += 1
        self.stats.texts += len(part)
        self.stats.batch_size.observe(len(part))
        done: list[tuple[_Job, Any]] = []
        for row, (job, index) in enumerate(part):
            job.rows[index] = outputs[row]
            job.counts[index] = counts[row]
            job.remaining -= 1
            if job.remaining == 0 and not job.failed:
                done.append((job, self._result(job.rows, job.counts)))
        return done

    def _fail(self, part: list[tuple[_Job, int]]) -> list[tuple[_Job, BaseException]]:
        failed = list({id(j): j for j, _ in part if not j.failed}.values())
        for job in failed:
            job.failed = True
        return [(job, InternalError(f"{self._kind} failed; see the server log")) for job in failed]

    @staticmethod
    def _resolve_all(outcomes: list[tuple[_Job, Any]]) -> None:
        """Settle the futures, one thread hop per event loop (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, outcome in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, outcome))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass


def split_by_length(token_lengths: list[int], overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[tuple[int, int]]:
    """Cut a batch sorted by length into consecutive forward passes so that padding costs less
    than the passes it adds: ``[(start, end), ...]``.

    Padding is computed work: 32 texts of 9 to 25 tokens padded to 25 waste a third of the pass.
    A dynamic program over the cut points minimises ``sum(overhead + n_i * longest_i)``.
    """
    best = [0.0] + [float("inf")] * len(token_lengths)
    cut = [0] * (len(token_lengths) + 1)
    for end in range(1, len(token_lengths) + 1):
        for start in range(end):
            cost = best[start] + overhead + (end - start) * token_lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    parts, end = [], len(token_lengths)
    while end > 0:
        parts.append((cut[end], end))
        end = cut[end]
    return parts[::-1]


def _settle(items: list[tuple[asyncio.Future, Any]]) -> None:
    for future, outcome in items:
        if future.done():  # cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
