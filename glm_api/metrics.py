"""Prometheus metrics for ``GET /metrics``, with prometheus_client.

Each app builds its own :class:`Metrics` (own ``CollectorRegistry``, nothing at module level),
so tests and several apps in one process never share counters. HTTP requests are counted by
the middleware, by route template (``/v1/models/{model_id:path}``, not the raw path) so label
values stay few. Engine figures are not pushed: a collector reads the engines' own counters
(:mod:`glm_api.engines.stats`) at scrape time, so the engine threads never touch this module.
Chat engine series carry a ``replica`` label (its index in ``--device``; ``"0"`` for one
engine), and ``glm_api_chat_replica_up{replica, device}`` says which replicas serve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from glm_api.engines.replica_balancer import replicas_of
from glm_api.engines.stats import ChatEngineStats, EmbeddingEngineStats
from glm_api.engines.stats import Histogram as StatHistogram
from glm_api.registry import ModelRegistry

PREFIX = "glm_api"
UNMATCHED_ROUTE = "<unmatched>"  # 404s: one label value, whatever path was asked for


class Metrics:
    def __init__(
        self, registry_getter: Callable[[], ModelRegistry | None], batch_stats: Callable[[], Any] | None = None
    ) -> None:
        """``batch_stats``: the batch runner's :class:`glm_api.batch_runner.BatchLineStats`, or None
        before the Batch API is first used."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_http_requests", "HTTP requests by method, route template and status code",
            ["method", "route", "status"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_http_request_duration_seconds", "Time from request to the end of the response (streams included)",
            ["route"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry,
        )
        self.registry.register(EngineCollector(registry_getter))
        if batch_stats is not None:
            self.registry.register(BatchCollector(batch_stats))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class EngineCollector(Collector):
    """Reads the loaded engines' counters on each scrape (nothing while models load)."""

    def __init__(
        self, registry_getter: Callable[[], ModelRegistry | None], batch_stats: Callable[[], Any] | None = None
    ) -> None:
        """``batch_stats``: the batch runner's :class:`glm_api.batch_runner.BatchLineStats`, or None
        before the Batch API is first used."""
        self._registry = registry_getter

    def describe(self) -> list[Metric]:
        return []  # families depend on what is loaded; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        registry = self._registry()
        if registry is None:
            return
        rejected = CounterMetricFamily(
            f"{PREFIX}_queue_rejections", "Requests refused with 429 because the engine's queue was full", labels=["engine", "model"]
        )
        families: list[Metric] = []
        if registry.chat is not None:
            families += list(_chat_replica_families(registry.chat, rejected))
        families.append(rejected)
        emb_waiting = GaugeMetricFamily(f"{PREFIX}_embedding_waiting_texts", "Texts queued for an embedding batch", labels=["model"])
        emb_texts = CounterMetricFamily(f"{PREFIX}_embedding_texts", "Texts embedded", labels=["model"])
        emb_batches = CounterMetricFamily(f"{PREFIX}_embedding_batches", "Embedding forward passes", labels=["model"])
        emb_sizes = HistogramMetricFamily(f"{PREFIX}_embedding_batch_size", "Texts per embedding forward pass", labels=["model"])
        for name, engine in registry.embeddings.items():
            stats = getattr(engine, "stats", None)
            emb_waiting.add_metric([name], getattr(engine, "num_waiting", 0))
            if isinstance(stats, EmbeddingEngineStats):
                emb_texts.add_metric([name], stats.texts)
                emb_batches.add_metric([name], stats.batches)
                _add_histogram(emb_sizes, [name], stats.batch_size)
                rejected.add_metric(["embedding", name], stats.rejected)
        families += [emb_waiting, emb_texts, emb_batches, emb_sizes]
        families += list(_rerank_families(getattr(registry, "rerankers", {}), rejected))
        yield from families


def _rerank_families(rerankers: dict, rejected: CounterMetricFamily) -> Iterator[Metric]:
    """Cross-encoders' queues and passes (cosine scoring shows up under its embedding model)."""
    labels = ["model"]
    waiting = GaugeMetricFamily(f"{PREFIX}_rerank_waiting_pairs", "Pairs queued for a rerank batch", labels=labels)
    pairs = CounterMetricFamily(f"{PREFIX}_rerank_pairs", "Pairs scored by a cross-encoder", labels=labels)
    batches = CounterMetricFamily(f"{PREFIX}_rerank_batches", "Cross-encoder forward passes", labels=labels)
    sizes = HistogramMetricFamily(f"{PREFIX}_rerank_batch_size", "Pairs per cross-encoder forward pass", labels=labels)
    for name, engine in rerankers.items():
        waiting.add_metric([name], getattr(engine, "num_waiting", 0))
        stats = getattr(engine, "stats", None)
        if isinstance(stats, EmbeddingEngineStats):
            pairs.add_metric([name], stats.texts)
            batches.add_metric([name], stats.batches)
            _add_histogram(sizes, [name], stats.batch_size)
            rejected.add_metric(["rerank", name], stats.rejected)
    yield from [waiting, pairs, batches, sizes]


class BatchCollector(Collector):
    """Batch API lines by state: running and pending now, completed and failed so far."""

    def __init__(self, stats_getter: Callable[[], Any]) -> None:
        self._stats = stats_getter

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        now = GaugeMetricFamily(f"{PREFIX}_batch_lines", "Batch lines running or waiting to run now", labels=["state"])
        done = CounterMetricFamily(
            f"{PREFIX}_batch_lines_finished", "Batch lines finished since start, by outcome", labels=["state"]
        )
        retried = CounterMetricFamily(
            f"{PREFIX}_batch_lines_retried", "Batch line attempts the engine refused for now (queue full), run again later"
        )
        preempted = CounterMetricFamily(
            f"{PREFIX}_batch_lines_preempted", "Batch lines stopped to free a slot for an interactive request, run again later"
        )
        running, pending = (stats.running, stats.pending) if stats is not None else (0, 0)
        now.add_metric(["running"], running)
        now.add_metric(["pending"], max(0, pending - running))
        for state in ("completed", "failed"):
            done.add_metric([state], stats.finished[state] if stats is not None else 0)
        retried.add_metric([], stats.retried if stats is not None else 0)
        preempted.add_metric([], stats.preempted if stats is not None else 0)
        yield from (now, done, retried, preempted)


def _chat_replica_families(chat, rejected: CounterMetricFamily) -> Iterator[Metric]:
    """The chat engine's figures, one series per replica (``replica="0"`` for a single engine),
    so a dashboard's queries stay the same when a device is added."""
    model = chat.model_name
    labels = ["model", "replica"]
    replicas = replicas_of(chat)
    up = GaugeMetricFamily(
        f"{PREFIX}_chat_replica_up", "1 while the chat replica serves, 0 once it is out of rotation", labels=[*labels, "device"]
    )
    running = GaugeMetricFamily(f"{PREFIX}_chat_running_sequences", "Sequences in the running decode batch", labels=labels)
    waiting = GaugeMetricFamily(f"{PREFIX}_chat_waiting_requests", "Chat requests queued for a batch slot", labels=labels)
    kv = GaugeMetricFamily(
        f"{PREFIX}_chat_kv_blocks", "KV cache blocks: used by rows, free, and free but still cached (a subset of free)",
        labels=[*labels, "state"],
    )
    stats = [(str(r.index), r.engine.stats) for r in replicas if isinstance(getattr(r.engine, "stats", None), ChatEngineStats)]
    # 429s: a router's own refusals (every replica full) plus any replica's.
    rejected.add_metric(["chat", model], getattr(chat, "rejected", 0) + sum(s.rejected for _, s in stats))
    for replica in replicas:
        values = [model, str(replica.index)]
        up.add_metric([*values, replica.device], 1 if replica.down is None else 0)
        running.add_metric(values, replica.engine.num_running)
        waiting.add_metric(values, replica.engine.num_waiting)
        if hasattr(replica.engine, "kv_blocks"):
            for state, count in zip(("used", "free", "cached"), replica.engine.kv_blocks):
                kv.add_metric([*values, state], count)
    yield from (up, running, waiting, kv)
    if stats:
        yield from _chat_families(model, stats)


def _chat_families(model: str, replicas: list[tuple[str, ChatEngineStats]]) -> Iterator[Metric]:
    labels = ["model", "replica"]

    def counter(name: str, doc: str, value: Callable[[ChatEngineStats], float]) -> CounterMetricFamily:
        family = CounterMetricFamily(f"{PREFIX}_chat_{name}", doc, labels=labels)
        for replica, stats in replicas:
            family.add_metric([model, replica], value(stats))
        return family

    yield counter("generated_tokens", "Completion tokens generated", lambda s: s.tokens_generated)
    yield counter("prompt_tokens", "Prompt tokens of admitted requests (those taken from the prefix cache included)", lambda s: s.prompt_tokens)
    yield counter("cached_prompt_tokens", "Prompt tokens taken from the prefix cache instead of prefilled", lambda s: s.cached_prompt_tokens)
    yield counter("decode_steps", "Engine steps (one forward over the decode tokens and prompt chunks scheduled)", lambda s: s.steps)
    yield counter("prefills", "Steps that carried prompt tokens (chunked prefill)", lambda s: s.prefills)
    yield counter("preemptions", "Rows whose KV blocks were taken back when the pool ran short, recomputed later", lambda s: s.preemptions)
    finished = CounterMetricFamily(f"{PREFIX}_chat_requests_finished", "Finished generations by reason", labels=[*labels, "reason"])
    batch = HistogramMetricFamily(f"{PREFIX}_chat_batch_size", "Sequences per decode step", labels=labels)
    ttft = HistogramMetricFamily(
        f"{PREFIX}_chat_time_to_first_token_seconds", "From arrival to the first generated token, by prompt length",
        labels=[*labels, "prompt_tokens"],
    )
    steps = HistogramMetricFamily(
        f"{PREFIX}_chat_step_seconds", "Engine step time: a pause every running stream waits through", labels=labels
    )
    for replica, stats in replicas:
        for reason, count in sorted(stats.finished.items()):
            finished.add_metric([model, replica, reason], count)
        _add_histogram(batch, [model, replica], stats.batch_size)
        for prompt_class, histogram in stats.ttft_seconds.items():
            _add_histogram(ttft, [model, replica, prompt_class], histogram)
        _add_histogram(steps, [model, replica], stats.step_seconds)
    yield from (finished, batch, ttft, steps)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: StatHistogram) -> None:
    buckets, total, _ = histogram.snapshot()
    family.add_metric(labels, [(floatToGoString(bound), count) for bound, count in buckets], total)
