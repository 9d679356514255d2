"""Embedding engine with dynamic batching, after infinity's batch handler.

Requests put their texts on one queue; a worker thread takes up to ``batch_size`` texts from
however many requests are waiting (after a short wait for more to arrive), sorts them by
length so little compute goes to padding, runs the model once, and hands each request its
rows back through an asyncio future. A request larger than a batch is spread over several.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from glm_api.engines.base import EmbeddingResult
from glm_api.engines.stats import EmbeddingEngineStats
from glm_api.engines.engine_thread import EngineThread
from glm_api.errors import EngineUnavailableError, InternalError, RateLimitError
from glm_api.families import embedding as family
from glm_api.families.base import LoadedEmbeddingModel

log = logging.getLogger(__name__)

#: The longest a batch waits for more texts, in units of ``batch_wait``.
MAX_WAIT_FACTOR = 10


@dataclass
class _Job:
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    vectors: list[np.ndarray | None] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    remaining: int = 0
    failed: bool = False

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.texts)
        self.counts = [0] * len(self.texts)
        self.remaining = len(self.texts)


class BatchingEmbeddingEngine(EngineThread):
    _kind = "embedding engine"

    def __init__(
        self,
        loaded: LoadedEmbeddingModel,
        model_name: str,
        *,
        batch_size: int = 32,
        batch_wait_ms: float = 2.0,
        max_queued_texts: int = 4096,
    ) -> None:
        self.loaded = loaded
        super().__init__(model_name)
        self.dimensions = loaded.dimensions
        self.max_seq_length = loaded.max_seq_length
        self.family = loaded.family
        self.source = loaded.source
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_queued_texts = max_queued_texts
        self.stats = EmbeddingEngineStats()
        self._queue: deque[tuple[_Job, int]] = deque()  # (job, index of one text)

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return family.count_tokens(self.loaded, texts)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return family.tokenize(self.loaded, texts)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.loaded.model.tokenizer.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return family.decode(self.loaded, ids)

    @property
    def vocab_size(self) -> int | None:
        return family.vocab_size(self.loaded)

    async def embed(self, texts: list[str]) -> EmbeddingResult:
        self.check_health()
        if not texts:
            return EmbeddingResult(np.zeros((0, self.dimensions), dtype=np.float32), [])
        loop = asyncio.get_running_loop()
        job = _Job(texts=list(texts), loop=loop, future=loop.create_future())
        with self._cv:
            if len(self._queue) + len(texts) > self.max_queued_texts:
                self.stats.rejected += 1
                raise RateLimitError(
                    f"the server is busy: {len(self._queue)} texts are waiting to be embedded; retry shortly"
                )
            self._queue.extend((job, i) for i in range(len(texts)))
            self.stats.requests += 1
            self._cv.notify()
        try:
            return await job.future
        finally:
            # Cancelled (the task's cancel also cancels the future): its texts leave the queue
            # now and free their places, rather than when the worker reaches them.
            if job.future.cancelled() or not job.future.done():
                job.failed = True
                with self._cv:
                    self._queue = deque(item for item in self._queue if item[0] is not job)

    # -- worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    batch = self._next_batch()
                    if batch is None:
                        break
                    try:
                        self._run(batch)
                    except Exception:  # a bug in one batch must not stop the engine or strand its callers
                        log.exception("embedding batch of %d failed", len(batch))
                        self._resolve_all(self._fail(batch))
        except BaseException as exc:
            self._dead = f"{type(exc).__name__}: {exc}"
            log.exception("embedding engine %s died", self.model_name)
        finally:
            with self._cv:
                pending, self._queue = list(self._queue), deque()
            for job in {id(j): j for j, _ in pending}.values():
                self._resolve(job, EngineUnavailableError("the embedding engine is shutting down"))

    def _next_batch(self) -> list[tuple[_Job, int]] | None:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            # Concurrent single-text requests reach the queue one by one, as fast as the event
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

    def _run(self, batch: list[tuple[_Job, int]]) -> None:
        """Embed what was gathered: tokenised once, sorted by length, in as many passes as
        padding makes worth it.

        The requests are answered together after the last pass: answering after each pass was
        measured slower (the replies and the clients' next requests then cut the following
        waves into small batches).
        """
        try:
            features = family.prepare(self.loaded, [job.texts[i] for job, i in batch])
            lengths = family.token_lengths(features)
        except Exception:  # fail these requests, keep serving
            log.exception("tokenising %d texts failed", len(batch))
            self._resolve_all(self._fail(batch))
            return
        order = sorted(range(len(batch)), key=lengths.__getitem__)
        done: list[tuple[_Job, EmbeddingResult | BaseException]] = []
        for start, end in split_by_length([lengths[i] for i in order]):
            rows = order[start:end]
            done += self._run_pass([batch[i] for i in rows], features, rows, [lengths[i] for i in rows])
        self._resolve_all(done)

    def _run_pass(
        self, part: list[tuple[_Job, int]], features: dict, rows: list[int], counts: list[int]
    ) -> list[tuple[_Job, EmbeddingResult | BaseException]]:
        """One forward pass over some rows of the batch; returns the requests it completed (or failed)."""
        try:
            vectors = family.forward(self.loaded, family.take_rows(self.loaded, features, rows))
        except Exception:  # fail the requests of this pass, keep serving
            log.exception("embedding pass of %d failed", len(part))
            return self._fail(part)
        self.stats.batches += 1
        self.stats.texts += len(part)
        self.stats.batch_size.observe(len(part))
        done: list[tuple[_Job, EmbeddingResult | BaseException]] = []
        for row, (job, index) in enumerate(part):
            job.vectors[index] = vectors[row]
            job.counts[index] = counts[row]
            job.remaining -= 1
            if job.remaining == 0 and not job.failed:
                done.append((job, EmbeddingResult(np.stack(job.vectors).astype(np.float32, copy=False), job.counts)))
        return done

    @staticmethod
    def _fail(part: list[tuple[_Job, int]]) -> list[tuple[_Job, EmbeddingResult | BaseException]]:
        failed = list({id(j): j for j, _ in part if not j.failed}.values())
        for job in failed:
            job.failed = True
        return [(job, InternalError("embedding failed; see the server log")) for job in failed]

    @classmethod
    def _resolve(cls, job: _Job, outcome: EmbeddingResult | BaseException) -> None:
        cls._resolve_all([(job, outcome)])

    @staticmethod
    def _resolve_all(outcomes: list[tuple[_Job, EmbeddingResult | BaseException]]) -> None:
        """Settle the futures, one thread hop per event loop (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, outcome in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, outcome))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass


#: Per forward pass overhead in padded tokens (a pass of n texts padded to L tokens costs about
#: ``OVERHEAD + n * L``): measured for MiniLM on 2 CPU cores as ~5.7 ms fixed (reading the
#: weights) + ~0.09 ms per token.
FORWARD_OVERHEAD_TOKENS = 64


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


def _settle(items: list[tuple[asyncio.Future, EmbeddingResult | BaseException]]) -> None:
    for future, outcome in items:
        if future.done():  # cancelled meanwhile
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
