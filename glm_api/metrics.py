"""Prometheus metrics for ``GET /metrics``, with prometheus_client.

Each app builds its own :class:`Metrics` (own ``CollectorRegistry``, nothing at module level),
so tests and several apps in one process never share counters. HTTP requests are counted by
the middleware, by route template (``/v1/models/{model_id:path}``, not the raw path) so label
values stay few. Engine figures are not pushed: a collector reads the engines' own counters
(:mod:`glm_api.engines.stats`) at scrape time, so the engine threads never touch this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from glm_api.engines.stats import ChatEngineStats, EmbeddingEngineStats
from glm_api.engines.stats import Histogram as StatHistogram
from glm_api.registry import ModelRegistry

PREFIX = "glm_api"
UNMATCHED_ROUTE = "<unmatched>"  # 404s: one label value, whatever path was asked for


class Metrics:
    def __init__(self, registry_getter: Callable[[], ModelRegistry | None]) -> None:
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

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class EngineCollector(Collector):
    """Reads the loaded engines' counters on each scrape (nothing while models load)."""

    def __init__(self, registry_getter: Callable[[], ModelRegistry | None]) -> None:
        self._registry = registry_getter

    def describe(self) -> list[Metric]:
        return []  # families depend on what is loaded; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        registry = self._registry()
        if registry is None:
            return
        running = GaugeMetricFamily(f"{PREFIX}_chat_running_sequences", "Sequences in the running decode batch", labels=["model"])
        waiting = GaugeMetricFamily(f"{PREFIX}_chat_waiting_requests", "Chat requests queued for a batch slot", labels=["model"])
        rejected = CounterMetricFamily(
            f"{PREFIX}_queue_rejections", "Requests refused with 429 because the engine's queue was full", labels=["engine", "model"]
        )
        chat = registry.chat
        chat_stats = getattr(chat, "stats", None)
        families: list[Metric] = [running, waiting, rejected]
        if chat is not None:
            running.add_metric([chat.model_name], chat.num_running)
            waiting.add_metric([chat.model_name], chat.num_waiting)
        if chat is not None and isinstance(chat_stats, ChatEngineStats):
            families += list(_chat_families(chat.model_name, chat_stats))
        if chat is not None and hasattr(chat, "kv_blocks"):
            families.append(_kv_blocks(chat.model_name, chat.kv_blocks))
            rejected.add_metric(["chat", chat.model_name], chat_stats.rejected)
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
        yield from families


def _kv_blocks(model: str, blocks: tuple[int, int, int]) -> Metric:
    family = GaugeMetricFamily(
        f"{PREFIX}_chat_kv_blocks", "KV cache blocks: used by rows, free, and free but still cached (a subset of free)",
        labels=["model", "state"],
    )
    for state, count in zip(("used", "free", "cached"), blocks):
        family.add_metric([model, state], count)
    return family


def _chat_families(model: str, stats: ChatEngineStats) -> Iterator[Metric]:
    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(f"{PREFIX}_chat_{name}", doc, labels=["model"])
        family.add_metric([model], value)
        return family

    yield counter("generated_tokens", "Completion tokens generated", stats.tokens_generated)
    yield counter("prompt_tokens", "Prompt tokens of admitted requests (those taken from the prefix cache included)", stats.prompt_tokens)
    yield counter("cached_prompt_tokens", "Prompt tokens taken from the prefix cache instead of prefilled", stats.cached_prompt_tokens)
    yield counter("decode_steps", "Engine steps (one forward over the decode tokens and prompt chunks scheduled)", stats.steps)
    yield counter("prefills", "Steps that carried prompt tokens (chunked prefill)", stats.prefills)
    yield counter("preemptions", "Rows whose KV blocks were taken back when the pool ran short, recomputed later", stats.preemptions)
    finished = CounterMetricFamily(f"{PREFIX}_chat_requests_finished", "Finished generations by reason", labels=["model", "reason"])
    for reason, count in sorted(stats.finished.items()):
        finished.add_metric([model, reason], count)
    yield finished
    batch = HistogramMetricFamily(f"{PREFIX}_chat_batch_size", "Sequences per decode step", labels=["model"])
    _add_histogram(batch, [model], stats.batch_size)
    yield batch
    ttft = HistogramMetricFamily(
        f"{PREFIX}_chat_time_to_first_token_seconds", "From admission request to the first generated token", labels=["model"]
    )
    _add_histogram(ttft, [model], stats.ttft_seconds)
    yield ttft


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: StatHistogram) -> None:
    buckets, total, _ = histogram.snapshot()
    family.add_metric(labels, [(floatToGoString(bound), count) for bound, count in buckets], total)
