"""The chat engine loop: a transformers causal LM served with continuous batching.

Here: the worker thread, the queues and their lock, admission, abort, and
:meth:`TransformersChatEngine._finish`, the one way a request leaves. Elsewhere, one home each:
:mod:`scheduler` (what a step computes), :mod:`kv_cache_manager` (blocks, prefix cache),
:mod:`model_runner` (the forward), :mod:`sampler` (next tokens), :mod:`output_processor` (text,
stop strings, finish reasons, chunks). The lock that ``generate``/``abort`` take on the event
loop covers bookkeeping only; block copies, the forward, sampling and streaming run without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import torch

from glm_api.engines.base import Constraint, EngineInfo, GenerationChunk, SamplingParams
from glm_api.engines.detokenizer import IncrementalDetokenizer
from glm_api.engines.engine_thread import EngineThread
from glm_api.engines.grammar import CompiledGrammar, GrammarCompiler
from glm_api.engines.kv_blocks import join_salts
from glm_api.engines.kv_cache_manager import BlockOps, KVCacheManager
from glm_api.engines.lora import LoraLayers
from glm_api.engines.model_runner import ModelRunner
from glm_api.engines.output_processor import OutputProcessor
from glm_api.engines.pacing import PrefillPacer
from glm_api.engines.pinned_prefix import PinnedPrefix, prefix_salt, write_prefix
from glm_api.engines.request_state import EngineRequest, stream_output
from glm_api.engines.sampler import Sampler, needs_per_row_sampling
from glm_api.engines.scheduler import Scheduler, SchedulerPlan, enqueue
from glm_api.engines.sequence import Sequence
from glm_api.engines.stats import ChatEngineStats
from glm_api.errors import (
    BadRequestError,
    ConflictError,
    ContextLengthError,
    EngineUnavailableError,
    InternalError,
    NotFoundError,
    RateLimitError,
)
from glm_api.families.base import LoadedChatModel
from glm_api.units import ceil_div

log = logging.getLogger(__name__)


class TransformersChatEngine(EngineThread):
    _kind = "chat engine"

    def __init__(
        self,
        loaded: LoadedChatModel,
        model_name: str,
        *,
        max_running: int = 32,
        max_waiting: int = 256,
        prefill_chunk_tokens: int = 512,
        prefix_cache_tokens: int = 4096,
        kv_cache_tokens: int | None = None,
        kv_block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        prefill_time_share: float = 0.15,
        prefill_step_ms: float = 500.0,
        compile_decode: bool = False,
        decode_graphs: bool = False,
    ) -> None:
        self.template = loaded.template
        self.context_length = loaded.context_length
        self.family = loaded.family
        self.source = loaded.source
        super().__init__(model_name)
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.stats = ChatEngineStats()
        self.runner = ModelRunner.for_model(
            loaded.model,
            model_name,
            context_length=self.context_length,
            block_size=kv_block_size,
            kv_cache_tokens=kv_cache_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            step_tokens=prefill_chunk_tokens + max_running,
            max_decode_rows=max_running,
            compile_decode=compile_decode,
            decode_graphs=decode_graphs,
        )
        if self.runner.decode is not None and (compile_decode or decode_graphs):
            self.runner.decode.warm_up()  # compile (capture) every row bucket before the first request
        self.kv = KVCacheManager(self.runner.pool, cached_blocks=ceil_div(prefix_cache_tokens, kv_block_size))
        pacer = PrefillPacer(prefill_chunk_tokens, prefill_time_share, prefill_step_ms / 1000)
        self.scheduler = Scheduler(self.kv, max_running=max_running, chunk_tokens=prefill_chunk_tokens, pacer=pacer)
        self.sampler = Sampler(self.runner.device)
        # A sequence alone never outgrows the pool, so growing never has to preempt the last one.
        self.row_limit = min(self.context_length, self.scheduler.capacity_tokens())
        self.output = OutputProcessor(self.row_limit, self.stats)
        self.grammars = GrammarCompiler(self.template, loaded.model.config.get_text_config().vocab_size)

        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []  # admission order (the newest is preempted first)
        self._aborts: set[str] = set()
        # P-Tuning v2 prefixes pinned in the pool, by name; the default one serves requests
        # that name none (a P-tuned checkpoint served as its own model).
        self.prefixes: dict[str, PinnedPrefix] = {}
        self.default_prefix: PinnedPrefix | None = None
        self._unloading: set[str] = set()  # adapters being unloaded: refused to new requests

    def pin_prefix(self, name: str, key_values: list, *, default: bool = False) -> PinnedPrefix:
        """Keep a prefix's keys/values (per layer, ``[kv_heads, tokens, head_dim]`` each) pinned
        in the KV pool for the requests that name it (:mod:`pinned_prefix`). At start-up, before
        :meth:`start`; MemoryError when the pool cannot hold it and still serve a request."""
        if self._thread is not None:
            raise RuntimeError("prefixes are pinned before the engine starts")
        tokens = key_values[0][0].shape[1]
        count = ceil_div(tokens, self.kv.block_size)
        if count + self.scheduler.watermark + 1 > self.kv.num_blocks:
            raise MemoryError(
                f"the KV cache ({self.kv.num_blocks} free blocks of {self.kv.block_size} tokens) cannot hold the "
                f"{tokens}-token prefix {name!r} and still serve requests; raise --kv-cache-tokens"
            )
        blocks = self.kv.pin(count)
        hidden = write_prefix(self.runner.pool, blocks, key_values)
        prefix = PinnedPrefix(name, tokens, tuple(blocks), hidden, prefix_salt(name))
        self.prefixes[name] = prefix
        if default:
            self.default_prefix = prefix
        # A request's own tokens fit in what the pinned blocks leave.
        self.row_limit = self.output.row_limit = min(self.context_length, self.scheduler.capacity_tokens())
        log.info("%s: prefix %s pinned: %d tokens in %d KV blocks", self.model_name, name, tokens, count)
        return prefix

    # -- what it serves, and its tokenizer (any thread) ------------------------------------------

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def describe(self) -> EngineInfo:
        return EngineInfo(self.family, self.source, str(self.runner.dtype))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.template.encode(text, add_special_tokens=True) for text in texts]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return self.template.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return self.template.decode(ids)

    @property
    def vocab_size(self) -> int | None:
        return self.runner.vocab_size

    # -- load, read from the event loop (for /metrics and the replica balancer) ---------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_blocks(self) -> tuple[int, int, int]:
        """Blocks in use, free, and (of the free ones) still holding cached prompt beginnings."""
        return self.kv.num_used, self.kv.num_free, self.kv.num_cached

    @property
    def queue_full(self) -> bool:
        """Whether :meth:`generate` would refuse a request now (429)."""
        with self._cv:
            return self._queue_full()

    def _queue_full(self) -> bool:
        """Caller holds the lock."""
        free = self.max_running - len(self._running)
        return len(self._waiting) - max(free, 0) >= self.max_waiting

    def outstanding_tokens(self) -> int:
        """Work this engine holds, in tokens: prompt tokens not yet computed plus tokens still
        allowed to be generated (each request's max_tokens left), running and waiting."""
        with self._cv:
            return sum(
                max(0, r.seq.num_uncomputed_tokens) + max(0, r.params.max_tokens - len(r.output_ids))
                for r in (*self._running, *self._waiting)
            )

    def cached_prefix_tokens(self, prompt_ids: list[int], prefix: str | None = None, adapter: str | None = None) -> int:
        """Tokens at the start of ``prompt_ids`` that this engine's KV pool holds now for a row
        behind the pinned prefix ``prefix`` (or the default one) under the LoRA adapter
        ``adapter``. The blocks change only under the lock, so the lookup sees them whole."""
        pinned = self._prefix(prefix)
        with self._cv:
            return self.kv.cached_prefix_tokens(prompt_ids, self._cache_root(pinned, adapter))

    def _cache_root(self, prefix: PinnedPrefix | None, adapter: str | None) -> bytes | None:
        """Where a row's prefix-cache chain starts: its keys/values depend on its pinned prefix
        and its adapter. One place, so a lookup's estimate and the row agree. Caller holds the lock."""
        salt = prefix.salt if prefix is not None else None
        return salt if adapter is None else join_salts(salt, self._adapter_root(adapter))

    def _prefix(self, name: str | None) -> PinnedPrefix | None:
        """The pinned prefix a request names (NotFoundError for one not pinned here), else the default."""
        if name is None:
            return self.default_prefix
        prefix = self.prefixes.get(name)
        if prefix is None:
            raise NotFoundError(f"prefix {name!r} is not loaded", param="model")
        return prefix

    # -- client side (event loop) ------------------------------------------------------------

    def compile_constraint(self, constraint: Constraint) -> CompiledGrammar:
        """The grammar for a constraint (cached); blocking, so callers run it off the event loop.
        A constraint that cannot be enforced is a BadRequestError."""
        return self.grammars.compile(constraint)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        """Admission: a prompt that could never fit the pool (400) or a full queue (429) is refused here."""
        self.check_health()
        if not prompt_ids:  # nothing to compute the first token from (a prompt that tokenised to nothing)
            raise BadRequestError("the prompt is empty after tokenisation: there is nothing to generate from", param="prompt")
        if len(prompt_ids) >= self.row_limit:  # it could never get a token out of the pool
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; this server's KV cache holds at most "
                f"{self.row_limit} tokens of one request (--kv-cache-tokens)",
                param="messages",
            )
        prefix = self._prefix(params.prefix)
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        seq = Sequence(
            list(prompt_ids),
            scores_prompt=params.prompt_logprobs is not None and len(prompt_ids) > 1,
            prefix=prefix,
            cache_salt=prefix.salt if prefix is not None else None,
        )
        request = EngineRequest(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            loop=asyncio.get_running_loop(),
            queue=queue,
            detok=IncrementalDetokenizer(self.template.decode, params.stop),
            seq=seq,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            stop_ids=self.template.stop_token_ids | frozenset(params.stop_token_ids),
            per_row=needs_per_row_sampling(params),
            matcher=params.grammar.matcher() if params.grammar is not None else None,
        )
        with self._cv:
            if params.adapter is not None:  # checked under the lock: an unload cannot slip in between
                seq.adapter = params.adapter
                seq.cache_salt = self._cache_root(prefix, params.adapter)
            if self._queue_full():
                self.stats.rejected += 1
                raise RateLimitError(
                    f"the server is busy: {len(self._running)} sequences running and "
                    f"{len(self._waiting)} waiting; retry shortly",
                    retry_after=1,
                )
            enqueue(self._waiting, request)
            self._cv.notify()
        return stream_output(queue, lambda: self.abort(request_id))

    # -- LoRA adapters (engines/lora.py); blocking: callers run them off the event loop --------

    @property
    def adapters(self) -> list[str]:
        lora = self.runner.lora
        return lora.names if lora is not None else []

    def load_adapter(self, name: str, path: str) -> None:
        """Read a peft LoRA folder, fit it onto this model (AdapterError when it does not fit) and
        serve it to requests whose ``params.adapter`` is ``name``; waits for the step in progress."""
        from glm_api.adapters.lora_files import read_lora

        weights = read_lora(name, path, self.model)
        with self._cv:
            if self.runner.lora is None:
                self.runner.lora = LoraLayers(self.model)
            if name in self.runner.lora:
                raise ConflictError(f"a LoRA adapter named {name!r} is already loaded", param="lora_name")
        self.runner.lora.add(weights)  # the lock of a step, not the engine's: the event loop never waits on a forward
        log.info("LoRA adapter %s loaded from %s (%d modules, rank <= %d)", name, path, len(weights.deltas), weights.max_rank)

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter. Refused (ConflictError, naming them) while requests of it are
        queued or running: they would lose their weights mid-answer."""
        lora = self.runner.lora
        with self._cv:
            if lora is None or name not in lora or name in self._unloading:
                raise NotFoundError(f"no LoRA adapter named {name!r} is loaded", param="lora_name")
            busy = [r.request_id for r in (*self._running, *self._waiting) if r.seq.adapter == name]
            if busy:
                shown = ", ".join(busy[:8]) + (f" and {len(busy) - 8} more" if len(busy) > 8 else "")
                raise ConflictError(
                    f"LoRA adapter {name!r} has {len(busy)} request(s) in flight ({shown}); unload it when they finish",
                    param="lora_name",
                )
            self._unloading.add(name)  # new requests of it are refused from now on
        try:
            lora.remove(name)
        finally:
            with self._cv:
                self._unloading.discard(name)
        log.info("LoRA adapter %s unloaded", name)

    def _adapter_root(self, name: str) -> bytes:
        """The adapter's prefix-cache root; NotFoundError when it is not (or no longer) loaded.
        Caller holds the lock."""
        lora = self.runner.lora
        if lora is None or name not in lora or name in self._unloading:
            raise NotFoundError(f"LoRA adapter {name!r} is not loaded", param="model")
        return lora.cache_roots[name]

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    # -- worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        devices = ", ".join(map(str, dict.fromkeys(self.runner.pool.layer_devices)))
        log.info("chat engine %s started on %s (max_running=%d)", self.model_name, devices, self.max_running)
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:  # bookkeeping only: no device work under the lock
                        while not (self._stopping or self._waiting or self._running or self._aborts):
                            self._cv.wait()
                        if self._stopping:
                            break
                        aborts, self._aborts = self._aborts, set()
                        for req in [r for r in (*self._waiting, *self._running) if r.request_id in aborts]:
                            self._finish(req, self.output.chunk(req, "", [], "abort"))
                        plan = self.scheduler.schedule(self._running, self._waiting)
                        if not plan.scheduled:  # nothing fits yet (cannot last: rows only wait on rows)
                            self._cv.wait(timeout=0.05)
                            continue
                        ops = self.kv.take_block_ops()
                    self._admitted(plan)
                    try:
                        self._step(plan, ops)
                    except torch.OutOfMemoryError:
                        self._out_of_memory(plan)
                    except Exception:  # one bad step must not kill the server
                        log.exception("chat engine step failed; failing %d running request(s)", len(self._running))
                        error = InternalError("generation failed; see the server log")
                        with self._cv:
                            for req in list(self._running):
                                self._finish(req, error)
                    finally:
                        self.output.flush()
        except BaseException as exc:  # the thread itself is going down: say so to everyone
            self._dead = f"{type(exc).__name__}: {exc}"
            log.exception("chat engine thread died")
        finally:
            self._fail_all(EngineUnavailableError("the chat engine is shutting down"))

    def _admitted(self, plan: SchedulerPlan) -> None:
        """Counts for requests starting now (a preempted one is not counted again)."""
        self.stats.preemptions += len(plan.preempted)
        for req in plan.admitted:
            if not req.started:
                req.started = True
                self.stats.prompt_tokens += len(req.prompt_ids)
                self.stats.cached_prompt_tokens += req.seq.num_cached_tokens or 0

    def _step(self, plan: SchedulerPlan, ops: BlockOps) -> None:
        started = time.perf_counter()
        self.kv.apply(ops)
        scheduled = [(req.seq, n) for req, n in plan.scheduled]
        starts = [seq.num_computed_tokens for seq, _ in scheduled]
        out = self.runner.execute(scheduled)
        finished = []
        with self._cv:
            self.kv.computed(scheduled)
        for i, logits in out.scored.items():
            self._score_prompt(plan.scheduled[i][0], starts[i], logits)
        if out.sampling:
            rows = [plan.scheduled[i][0] for i in out.sampling]
            logits = out.logits
            if any(req.params.max_tokens == 0 for req in rows):  # scored only: nothing to generate
                finished = [(req, self.output.chunk(req, "", [], "length")) for req in rows if req.params.max_tokens == 0]
                keep = [j for j, req in enumerate(rows) if req.params.max_tokens > 0]
                rows, logits = [rows[j] for j in keep], logits[keep]
            if rows:
                sampled = self.sampler.sample(rows, logits)
                finished += self.output.process(rows, sampled.tokens, sampled.logprobs)
        if finished:
            with self._cv:
                for req, chunk in finished:
                    self._finish(req, chunk)
        seconds = time.perf_counter() - started
        self.scheduler.observe(plan, seconds)
        self.stats.step_seconds.observe(seconds)
        self.stats.steps += 1
        self.stats.prefills += any(n > 1 for _, n in plan.scheduled)
        self.stats.batch_size.observe(len(plan.scheduled))

    def _score_prompt(self, req: EngineRequest, past: int, logits: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens that ``logits`` (of positions ``past``,
        ``past + 1``, ...) predict, appended to what earlier chunks gave; a position scored before
        (the request was preempted and computes its prompt again) is not scored twice."""
        scored = req.prompt_logprobs
        first = max(past, len(scored) - 1)  # position p predicts prompt token p + 1
        last = min(past + len(logits), len(req.prompt_ids) - 1)
        if first < last:
            targets = req.prompt_ids[first + 1 : last + 1]
            scored += self.sampler.score(logits[first - past : last - past], targets, req.params.prompt_logprobs)
        if len(scored) == len(req.prompt_ids):
            req.seq.scores_prompt = False  # all there: a recompute after preemption may use the prefix cache

    def _out_of_memory(self, plan: SchedulerPlan) -> None:
        """A device out-of-memory error in a step fails the requests whose prompt chunks it
        carried (or, with none, the newest); the others lose nothing (their counts did not move)
        and go on next step."""
        chunked = [req for req, n in plan.scheduled if n > 1] or [plan.scheduled[-1][0]]
        log.error("out of device memory in a step of %d rows; failing %d request(s)", len(plan.scheduled), len(chunked))
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()
        error = EngineUnavailableError("out of device memory for this request; retry later or send a shorter prompt")
        with self._cv:
            for req in chunked:
                self._finish(req, error)

    def _finish(self, req: EngineRequest, last: GenerationChunk | BaseException) -> None:
        """The one way a request leaves: out of the queues, its blocks back to the pool, its last
        chunk (with the finish reason) or its error to its client. Caller holds the lock."""
        if req in self._running:
            self._running.remove(req)
        elif req in self._waiting:
            self._waiting.remove(req)
        self.output.send(req, last)
        if isinstance(last, GenerationChunk):
            self.stats.finished[last.finish_reason] += 1
        self.kv.free(req.seq)

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            for req in [*self._waiting, *self._running]:
                try:
                    self._finish(req, error)
                except Exception:  # the pool's bookkeeping may be what stopped the thread: still tell everyone
                    log.exception("freeing the blocks of request %s failed", req.request_id)
        self.output.flush()
