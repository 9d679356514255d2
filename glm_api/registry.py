"""The model registry: the loaded engines, looked up by the names clients use, and their loading.

:func:`build_registry` loads what :func:`~glm_api.model_sources.resolve_model_sources` chose from
the settings (slow: seconds to minutes, run in a thread) and wraps each model in its engine;
:class:`ModelRegistry` holds the engines, starts and stops them, routes a request's model name
to its engine, and loads or unloads LoRA adapters at run time. What to load is decided in
glm_api/model_sources.py, cheaply and before the server starts; its names are re-exported here
for the modules and tests that import them from the registry.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from glm_api.config import Settings
from glm_api.device_map import layer_split
from glm_api.devices import resolve_device, resolve_devices, resolve_dtype
from glm_api.engines.base import ChatEngine, EmbeddingEngine
from glm_api.errors import AdapterError, BadRequestError, ConflictError, NotFoundError
from glm_api.model_sources import (
    PACKAGED_CHAT_NAME,
    PACKAGED_EMBEDDING_NAME,
    ModelSource,
    ModelSources,
    StartupError,
    resolve_model_sources,
)

if TYPE_CHECKING:
    import torch

    from glm_api.device_map import LayerSplit
    from glm_api.engines.rerank_engine import RerankEngine

__all__ = [
    "PACKAGED_CHAT_NAME",
    "PACKAGED_EMBEDDING_NAME",
    "PREFERRED_EMBEDDING",
    "ModelRegistry",
    "ModelSource",
    "ModelSources",
    "StartupError",
    "build_registry",
    "layer_split",
    "resolve_model_sources",
]

log = logging.getLogger(__name__)

#: The seed's preferred embedding model, the default of /embedding when it is loaded.
PREFERRED_EMBEDDING = "text2vec-large-chinese"


class ModelRegistry:
    """The loaded engines, looked up by the names clients use."""

    def __init__(
        self,
        chat: ChatEngine | None,
        embeddings: dict[str, EmbeddingEngine],
        rerankers: dict[str, RerankEngine] | None = None,
        variants: dict[str, ChatEngine] | None = None,
    ) -> None:
        self.chat = chat
        self.embeddings = embeddings
        self.rerankers = rerankers or {}  # cross-encoders; each has its own worker thread
        # Other names the chat engine serves (a P-Tuning v2 prefix over its model), each a view
        # of ``chat`` with its ``parent``: started and stopped with it.
        self.variants = variants or {}
        self.created = int(time.time())
        self.adapters: dict[str, str] = {}  # LoRA adapters of the chat model: name -> folder
        self._adapter_lock = threading.Lock()  # one load or unload at a time

    def start(self) -> None:
        if self.chat is not None:
            self.chat.start()
        for engine in [*self.embeddings.values(), *self.rerankers.values()]:
            engine.start()

    def stop(self) -> None:
        if self.chat is not None:
            self.chat.stop()
        for engine in [*self.embeddings.values(), *self.rerankers.values()]:
            engine.stop()

    def check_health(self) -> None:
        if self.chat is not None:
            self.chat.check_health()
        for engine in [*self.embeddings.values(), *self.rerankers.values()]:
            engine.check_health()

    def replica_status(self) -> list[dict] | None:
        """Each chat replica's state and load (index, device, state, running, waiting) when the
        chat model runs as several replicas; None otherwise."""
        from glm_api.engines.replica_balancer import ReplicaBalancer, replicas_of

        if not isinstance(self.chat, ReplicaBalancer):
            return None
        return [replica.status() for replica in replicas_of(self.chat)]

    def chat_engine(self, name: str | None) -> ChatEngine:
        """The chat engine (under a LoRA adapter's name: the engine that runs requests with that
        adapter); a name that is not the loaded chat model is a 404, never a swap."""
        from glm_api.engines.adapter_engine import AdapterEngine

        if self.chat is None:
            raise NotFoundError("this server has no chat model loaded", param="model")
        if name and name in self.variants:
            return self.variants[name]
        if name and name in self.adapters:
            return AdapterEngine(self.chat, name)
        if name and name != self.chat.model_name:
            names = ", ".join(repr(n) for n in (self.chat.model_name, *self.variants))
            adapters = f"; its LoRA adapters: {', '.join(self.adapters)}" if self.adapters else ""
            raise NotFoundError(f"model {name!r} is not loaded; chat models here: {names}{adapters}", param="model")
        return self.chat

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter onto every replica of the chat model and serve it as ``name``
        (blocking: seconds; AdapterError when it does not fit the model)."""
        from glm_api.engines.replica_balancer import replicas_of

        if self.chat is None:
            raise NotFoundError("this server has no chat model to load an adapter onto", param="lora_name")
        with self._adapter_lock:
            taken = {self.chat.model_name, *self.embeddings, *self.rerankers, *self.variants, *self.adapters}
            if name in taken:
                raise ConflictError(f"{name!r} is already the name of a model or adapter here", param="lora_name")
            done = []
            try:
                for replica in replicas_of(self.chat):
                    replica.engine.load_adapter(name, path)
                    done.append(replica.engine)
            except BaseException:
                for engine in done:  # all replicas or none
                    engine.unload_adapter(name)
                raise
            self.adapters = {**self.adapters, name: str(path)}  # replaced, not changed: the event loop iterates it

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter; ConflictError while requests of it are in flight."""
        from glm_api.engines.replica_balancer import replicas_of

        with self._adapter_lock:
            if name not in self.adapters or self.chat is None:
                raise NotFoundError(f"no LoRA adapter named {name!r} is loaded", param="lora_name")
            done = []
            try:
                for replica in replicas_of(self.chat):
                    replica.engine.unload_adapter(name)  # ConflictError while it has requests in flight
                    done.append(replica.engine)
            except ConflictError:
                for engine in done:  # all replicas or none
                    engine.load_adapter(name, self.adapters[name])
                raise
            self.adapters = {n: p for n, p in self.adapters.items() if n != name}

    def embedding_engine(self, name: str | None) -> EmbeddingEngine:
        if not self.embeddings:
            raise NotFoundError("this server has no embedding model loaded", param="model")
        if not name:
            return self.embeddings.get(PREFERRED_EMBEDDING) or next(iter(self.embeddings.values()))
        try:
            return self.embeddings[name]
        except KeyError:
            raise NotFoundError(
                f"model {name!r} is not loaded; embedding models here: {', '.join(self.embeddings)}", param="model"
            ) from None

    def rerank_engine(self, name: str | None) -> RerankEngine:
        """A cross-encoder by name (the first one by default); an embedding model's name, or no
        name when no cross-encoder is loaded, scores by that model's cosine similarity."""
        from glm_api.engines.rerank_engine import CosineRerankEngine

        if name and name in self.rerankers:
            return self.rerankers[name]
        if name and name in self.embeddings:
            return CosineRerankEngine(self.embeddings[name])
        if name:
            loaded = ", ".join([*self.rerankers, *self.embeddings]) or "none"
            raise NotFoundError(f"model {name!r} is not loaded; models that can rerank here: {loaded}", param="model")
        if self.rerankers:
            return next(iter(self.rerankers.values()))
        return CosineRerankEngine(self.embedding_engine(None))

    def tokenizer_owner(self, name: str | None) -> ChatEngine | EmbeddingEngine:
        """/tokenize works on the chat model by default, or any loaded model by name."""
        if name and name in self.embeddings:
            return self.embeddings[name]
        if self.chat is None and not name:
            raise BadRequestError("no chat model is loaded; name an embedding model", param="model")
        return self.chat_engine(name)


def build_registry(settings: Settings, sources: ModelSources | None = None) -> ModelRegistry:
    """Load every model (blocking: seconds to minutes) and wrap each in its engine. With several
    devices in ``--device`` the chat model is loaded once per device, one engine each, behind a
    :class:`~glm_api.engines.replica_balancer.ReplicaBalancer`, or with ``--device-map`` once, split by layers
    over them, in one engine; embedding models load on the first device (or
    ``--embedding-device``)."""
    from glm_api.engines.embedding_engine import BatchingEmbeddingEngine
    from glm_api.engines.replica_balancer import ReplicaBalancer
    from glm_api.families.embedding import load_embedding_model

    sources = sources or resolve_model_sources(settings)
    devices = resolve_devices(settings.device)
    split = layer_split(settings, devices)
    if split is None and settings.device_map != "none":
        log.info("--device-map %s with one device (%s): the chat model loads whole", settings.device_map, devices[0])
    chat: ChatEngine | None = None
    if sources.chat is not None and split is not None:  # one model over all the devices: one engine
        chat = _load_chat_replica(settings, sources.chat, devices[0], 0, 1, split, ptuning=sources.ptuning)
    elif sources.chat is not None:
        engines = [
            _load_chat_replica(settings, sources.chat, device, i, len(devices), ptuning=sources.ptuning)
            for i, device in enumerate(devices)
        ]
        chat = engines[0] if len(engines) == 1 else ReplicaBalancer(engines, [str(d) for d in devices])
    device = resolve_device(settings.embedding_device) if settings.embedding_device else devices[0]
    dtype = resolve_dtype(settings.dtype, device)
    embeddings: dict[str, EmbeddingEngine] = {}
    for source in sources.embeddings:
        started = time.monotonic()
        log.info("loading embedding model %s from %s on %s (%s)", source.name, source.path, device, dtype)
        loaded_emb = load_embedding_model(source.path, device, dtype, settings.embedding_max_seq_length)
        log.info(
            "embedding model %s ready: %s, %d dimensions, max %d tokens, %.1f s",
            source.name, loaded_emb.family, loaded_emb.dimensions, loaded_emb.max_seq_length,
            time.monotonic() - started,
        )
        embeddings[source.name] = BatchingEmbeddingEngine(
            loaded_emb,
            source.name,
            batch_size=settings.embedding_batch_size,
            batch_wait_ms=settings.embedding_batch_wait_ms,
            max_queued_texts=settings.max_embedding_queue,
        )
    rerankers: dict[str, RerankEngine] = {}
    for source in sources.rerankers:
        rerankers[source.name] = _load_reranker(settings, source, device, dtype)
    from glm_api.ptuning import prefixed_views

    variants = prefixed_views(chat, sources.ptuning) if chat is not None else {}
    registry = ModelRegistry(chat, embeddings, rerankers, variants)
    for source in sources.loras:
        try:
            registry.load_adapter(source.name, str(source.path))
        except AdapterError as exc:  # refused now, not served to answer wrongly
            raise StartupError(f"--lora {source.name}={source.path}: {exc.message}") from None
    return registry


def _load_reranker(settings: Settings, source: ModelSource, device: torch.device, dtype: torch.dtype) -> RerankEngine:
    """A cross-encoder on the embedding models' device, behind the same batching as they are."""
    from glm_api.engines.rerank_engine import BatchingRerankEngine
    from glm_api.families.cross_encoder import load_cross_encoder

    started = time.monotonic()
    log.info("loading rerank model %s from %s on %s (%s)", source.name, source.path, device, dtype)
    loaded = load_cross_encoder(source.path, device, dtype)
    log.info(
        "rerank model %s ready: %s, max %d tokens per pair, %.1f s",
        source.name, loaded.family, loaded.max_seq_length, time.monotonic() - started,
    )
    return BatchingRerankEngine(
        loaded, source.name, batch_size=settings.embedding_batch_size,
        batch_wait_ms=settings.embedding_batch_wait_ms, max_queued_pairs=settings.max_embedding_queue,
    )


def _load_chat_replica(
    settings: Settings,
    source: ModelSource,
    device: torch.device,
    index: int,
    count: int,
    split: LayerSplit | None = None,
    *,
    ptuning: tuple[ModelSource, ...] = (),
) -> ChatEngine:
    """The chat model loaded on one device (or split over ``split``'s devices), in its own
    engine (own KV pool and prefix cache), with P-Tuning v2 prefixes pinned in that pool."""
    from glm_api.engines.cache_layout import UnsupportedCacheError
    from glm_api.engines.chat_engine import TransformersChatEngine
    from glm_api.engines.decode_step import decode_options
    from glm_api.families.dense_kernels import pack_linears, packed_linear_available
    from glm_api.families.detect import load_chat_model
    from glm_api.families.timing_store import FILE_NAME, TimingStore

    dtype = resolve_dtype(settings.dtype, device)
    timings = TimingStore(settings.cache_dir / FILE_NAME, fresh=settings.kernel_timings == "fresh")
    started = time.monotonic()
    replica = f" (replica {index} of {count})" if count > 1 else ""
    where = ", ".join(map(str, split.devices)) + f" (--device-map {split.mode})" if split else str(device)
    log.info("loading chat model %s from %s on %s (%s)%s", source.name, source.path, where, dtype, replica)
    if source.trust_remote_code and index == 0:
        log.warning(
            "trust_remote_code is ON for %s: Python code from %s may run in this process", source.name, source.path
        )
    loaded = load_chat_model(
        source.path, device, dtype, settings.cache_dir, trust_remote_code=source.trust_remote_code,
        quantize=settings.quantize, split=split,
    )
    log.info(
        "chat model %s ready%s: %s family, context %d, %.1f s",
        source.name, replica, loaded.family, loaded.context_length, time.monotonic() - started,
    )
    if settings.quantize != "none":  # kernels by measurement: the fastest per width, or a warning
        from glm_api.families.quant_kernels import choose_kernels

        # 8: a few streams (int4's CPU kernel cost grows with every row; where dequantising takes over)
        quant_widths = sorted({1, min(8, settings.max_running), settings.max_running, settings.prefill_chunk_tokens})
        choose_kernels(loaded.model, dtype, widths=tuple(quant_widths), timings=timings)
    compile_decode, decode_graphs = decode_options(settings.compile_decode, settings.cuda_graphs, device)
    pack = settings.cpu_kernels == "auto" and not compile_decode and packed_linear_available(device, dtype)
    if pack:
        widths = (1, settings.max_running, settings.prefill_chunk_tokens)
        pack_linears(loaded.model, widths=widths, head_rows=settings.max_running, timings=timings)
    try:
        engine = TransformersChatEngine(
            loaded, source.name, max_running=settings.max_running, max_waiting=settings.max_waiting,
            compile_decode=compile_decode, decode_graphs=decode_graphs,
            prefix_cache_tokens=settings.prefix_cache_tokens, kv_cache_tokens=settings.kv_cache_tokens,
            kv_block_size=settings.kv_block_size, prefill_chunk_tokens=settings.prefill_chunk_tokens,
            gpu_memory_utilization=settings.gpu_memory_utilization, prefill_time_share=settings.prefill_time_share,
            prefill_step_ms=settings.prefill_step_ms,
        )
    except UnsupportedCacheError as exc:  # refused now, not served to fail every request
        raise StartupError(f"cannot serve {source.path} as the chat model {source.name!r}: {exc}") from None
    decode = engine.runner.decode
    if pack and decode is not None and decode.direct is not None:  # fused where it times faster
        decode.direct.fuse_projections(loaded.model, widths=(1, settings.max_running), timings=timings)
    if loaded.family == "chatglm3":
        from glm_api.ptuning import pin_prefixes

        pin_prefixes(engine, source, ptuning, dtype)
    return engine
