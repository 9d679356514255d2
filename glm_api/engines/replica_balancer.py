"""One chat engine over several replicas of the same model, one per device.

:class:`ReplicaBalancer` implements the :class:`~glm_api.engines.base.ChatEngine` interface, so
the serving layer cannot tell it from one engine; the registry builds it when ``--device``
lists more than one device. Each replica is a whole engine with its own worker thread, KV pool
and prefix cache (vLLM's ``--data-parallel-size``, SGLang's ``--dp-size``, in one process).

Where a new request goes (decided on the event loop, in :meth:`ReplicaBalancer.generate`):

1. replicas whose worker died or stopped are out of rotation (logged once, shown by ``/health``);
2. replicas whose queue is full are skipped: the admission limits (``--max-running``,
   ``--max-waiting``) are per replica, and a request is refused (429) only when every replica
   is full;
3. of the others, the one where the request leaves the least outstanding work wins: the tokens
   the replica already owes (prompt tokens not yet computed plus each request's remaining
   ``max_tokens``, running and waiting: :meth:`outstanding_tokens`) plus the prompt tokens this
   request would compute there, which are fewer where the replica's pool already holds the
   prompt's beginning (:meth:`cached_prefix_tokens`, looked up from the chain root the row will
   have: its P-Tuning prefix's and its LoRA adapter's, whose blocks hold other keys/values than
   the base's for the same tokens). So a prompt that continues an earlier one
   follows its cached beginning as long as loads are close, "close" meaning the load difference
   is smaller than the prompt tokens the cache saves; otherwise it goes where the work is least.
   Ties go to the replica with fewer requests, then in turn.

A replica is told apart in logs, ``/health`` and ``/metrics`` by its index in ``--device`` and
its device.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from glm_api.engines.base import ChatEngine, EngineInfo, GenerationChunk, SamplingParams
from glm_api.errors import APIError, ContextLengthError, EngineUnavailableError, RateLimitError

log = logging.getLogger(__name__)


class BalancedEngine(ChatEngine, Protocol):
    """What the balancer reads of each replica besides the chat-engine interface."""

    @property
    def queue_full(self) -> bool: ...

    def outstanding_tokens(self) -> int: ...

    def cached_prefix_tokens(self, prompt_ids: list[int], prefix: str | None = None, adapter: str | None = None) -> int: ...


@dataclass(eq=False)
class Replica:
    index: int  # its place in --device: the label in logs, /health and /metrics
    engine: Any  # a BalancedEngine (or, from replicas_of, any ChatEngine)
    device: str
    down: str | None = None  # why it cannot serve; a balancer's replica never comes back

    def status(self) -> dict[str, Any]:
        """For ``/health``."""
        out: dict[str, Any] = {
            "replica": self.index,
            "device": self.device,
            "state": "ok" if self.down is None else "down",
            "running": self.engine.num_running,
            "waiting": self.engine.num_waiting,
        }
        if self.down is not None:
            out["detail"] = self.down
        return out


class ReplicaBalancer:
    def __init__(self, engines: Sequence[BalancedEngine], devices: Sequence[str], *, prefix_affinity: bool = True) -> None:
        if not engines or len(engines) != len(devices):
            raise ValueError("a balancer needs one device name per replica, and at least one replica")
        first = engines[0]
        names = {e.model_name for e in engines}
        if len(names) > 1:
            raise ValueError(f"replicas of one balancer serve one model, not {sorted(names)}")
        self.model_name = first.model_name
        self.context_length = first.context_length
        self.template = first.template
        self.replicas = [Replica(i, engine, device) for i, (engine, device) in enumerate(zip(engines, devices))]
        self.prefix_affinity = prefix_affinity
        self.rejected = 0  # requests refused because every replica was full
        self._owners: dict[str, Replica] = {}  # request id -> the replica running it
        self._turn = 0
        self._stopping = False

    @property
    def model(self) -> Any:
        """The first replica's model (every replica holds the same weights)."""
        return self.replicas[0].engine.model

    # -- what it serves and its tokenizer: every replica's is the same ---------------------------

    def describe(self) -> EngineInfo:
        return self.replicas[0].engine.describe()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.replicas[0].engine.tokenize(texts)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return self.replicas[0].engine.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return self.replicas[0].engine.decode(ids)

    @property
    def vocab_size(self) -> int | None:
        return self.replicas[0].engine.vocab_size

    @property
    def devices(self) -> list[str]:
        return [r.device for r in self.replicas]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        for replica in self.replicas:
            replica.down = None
            replica.engine.start()
        log.info(
            "chat model %s: %d replicas on %s", self.model_name, len(self.replicas), ", ".join(self.devices)
        )

    def stop(self) -> None:
        self._stopping = True  # replicas going down now are not failures
        for replica in self.replicas:
            replica.engine.stop()

    def refresh(self) -> list[Replica]:
        """The replicas in rotation; those that can no longer serve leave it (logged once)."""
        alive = []
        for replica in self.replicas:
            if replica.down is None:
                try:
                    replica.engine.check_health()
                except EngineUnavailableError as exc:
                    self._retire(replica, exc.message)
                    continue
                alive.append(replica)
        return alive

    def check_health(self) -> None:
        """Raise only when no replica can serve."""
        if not self.refresh():
            reasons = "; ".join(f"replica {r.index} ({r.device}): {r.down}" for r in self.replicas)
            raise EngineUnavailableError(f"no replica of chat model {self.model_name} can serve: {reasons}")

    def _retire(self, replica: Replica, reason: str) -> None:
        replica.down = reason
        left = sum(r.down is None for r in self.replicas)
        log.log(
            logging.INFO if self._stopping else logging.ERROR,
            "chat replica %d (%s) of %s is out of rotation: %s; %d of %d replicas serve",
            replica.index, replica.device, self.model_name, reason, left, len(self.replicas),
        )

    # -- requests ------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return sum(r.engine.num_running for r in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(r.engine.num_waiting for r in self.replicas)

    def compile_constraint(self, constraint: Any) -> Any:
        """Compiled by one replica (one grammar cache); the grammar fits every replica, which
        share the vocabulary."""
        alive = self.refresh()
        return (alive[0] if alive else self.replicas[0]).engine.compile_constraint(constraint)

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        alive = self.refresh()
        if not alive:
            self.check_health()  # raises, naming each replica's reason
        candidates = [r for r in alive if not r.engine.queue_full]
        if not candidates:
            self.rejected += 1
            raise RateLimitError(
                f"the server is busy: all {len(alive)} chat replicas are full "
                f"({self.num_running} sequences running, {self.num_waiting} waiting); retry shortly",
                retry_after=1,
            )
        error: APIError | None = None
        for replica in self.rank(candidates, prompt_ids, params.prefix, params.adapter):
            try:
                stream = replica.engine.generate(prompt_ids, params, request_id)
            except EngineUnavailableError as exc:  # died since the check
                self._retire(replica, exc.message)
                error = exc
            except (RateLimitError, ContextLengthError) as exc:  # this replica's limits; another may take it
                error = exc
            else:
                self._owners[request_id] = replica
                return self._tracked(request_id, stream)
        assert error is not None
        raise error

    def rank(
        self, candidates: Sequence[Replica], prompt_ids: list[int], prefix: str | None = None, adapter: str | None = None
    ) -> list[Replica]:
        """``candidates`` best first: least outstanding work once this prompt is added (prompt
        tokens the replica has cached for this prefix and adapter are not work), then fewest
        requests, then in turn."""
        n = len(self.replicas)
        keyed = []
        for replica in candidates:
            engine = replica.engine
            cached = engine.cached_prefix_tokens(prompt_ids, prefix, adapter) if self.prefix_affinity else 0
            work = engine.outstanding_tokens() + len(prompt_ids) - cached
            keyed.append(((work, engine.num_running + engine.num_waiting, (replica.index - self._turn) % n), replica))
        self._turn += 1
        keyed.sort(key=lambda item: item[0])
        return [replica for _, replica in keyed]

    async def _tracked(self, request_id: str, stream: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
        try:
            async for chunk in stream:
                yield chunk
        finally:
            self._owners.pop(request_id, None)
            await stream.aclose()  # a client that went away aborts the request on its replica

    def abort(self, request_id: str) -> None:
        replica = self._owners.pop(request_id, None)
        if replica is not None:
            replica.engine.abort(request_id)

    def replica_of(self, request_id: str) -> int | None:
        """The index of the replica running a request (None once it ended)."""
        replica = self._owners.get(request_id)
        return replica.index if replica is not None else None


def replicas_of(engine: Any) -> list[Replica]:
    """The replicas behind a chat engine, current state included: a balancer's, or a single
    engine as replica 0."""
    if isinstance(engine, ReplicaBalancer):
        engine.refresh()
        return list(engine.replicas)
    replica = Replica(0, engine, str(getattr(engine, "device", "")))
    try:
        engine.check_health()
    except EngineUnavailableError as exc:
        replica.down = exc.message
    return [replica]
