"""Chat engine over a transformers causal LM with iteration-level (continuous) batching.

One worker thread owns the model. Each turn of its loop drops aborted requests, asks the
:mod:`scheduler` what to compute (every decoding row's next token, then prompt chunks, admitting
waiting requests while the KV pool has room), and runs it as one forward over the packed tokens
(:mod:`paged_attention`): a long prompt is prefilled a chunk per step between the other rows'
decode steps, and each row's keys/values live in blocks of its own (:mod:`kv_pool`,
:mod:`kv_blocks`), so one long conversation neither freezes nor pads the others. Prompt
beginnings already in the pool (a system prompt, earlier turns) are reused, not recomputed.
Finished rows leave at once. Output crosses back to the event loop through each request's
asyncio queue, one thread hop per loop per step; no torch call runs on the event loop.

Per step the Python work is kept small beside the forward: one argmax over the rows that sample
for greedy rows (penalties and sampling only for the rows that ask for them), incremental
detokenization, and one ``call_soon_threadsafe`` per event loop rather than one per row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import torch

from glm_api.engines.base import EngineInfo, GenerationChunk, SamplingParams
from glm_api.engines.detokenizer import IncrementalDetokenizer
from glm_api.engines.grammar import CompiledGrammar, Constraint, GrammarCompiler, mask_logits
from glm_api.engines.kv_blocks import BlockManager
from glm_api.engines.kv_pool import KVPool, KVShape, layer_devices, size_pool
from glm_api.engines.outbox import Outbox
from glm_api.engines.pacing import PrefillPacer
from glm_api.engines.paged_attention import PagedStep, ScheduledRow, install
from glm_api.engines.request_state import EngineRequest, stream_output
from glm_api.engines.sampling import apply_penalties, needs_per_row_sampling, sample_token
from glm_api.engines.scheduler import RowKV, Scheduler, StepPlan
from glm_api.engines.stats import ChatEngineStats
from glm_api.engines.engine_thread import EngineThread
from glm_api.errors import ContextLengthError, EngineUnavailableError, InternalError, RateLimitError
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
    ) -> None:
        self.model = loaded.model
        self.template = loaded.template
        self.context_length = loaded.context_length
        self.family = loaded.family
        self.source = loaded.source
        super().__init__(model_name)
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.device = next(self.model.parameters()).device
        self.stats = ChatEngineStats()
        install(self.model)
        shape = KVShape.of(self.model.config, next(self.model.parameters()).dtype)
        # Each layer's keys and values beside it: all on one device, unless the model is split.
        devices = layer_devices(self.model, shape.layers)
        num_blocks = size_pool(
            shape,
            devices,
            block_size=kv_block_size,
            kv_cache_tokens=kv_cache_tokens,
            context_length=self.context_length,
            gpu_memory_utilization=gpu_memory_utilization,
            step_tokens=prefill_chunk_tokens + max_running,
            hidden_size=self.model.config.get_text_config().hidden_size,
            model_name=model_name,
        )
        self.pool = KVPool(shape, num_blocks, kv_block_size, devices)
        self._keep_device = self.device
        if hasattr(self.model, "_hf_hook"):  # split over devices (glm_api/device_map.py)
            # Steps are built on the first layer's device and the hooks bring the logits back
            # there; the last hidden states stay on the last device, so the rows to keep are
            # picked with an index on the CPU (one that any device's tensor accepts).
            self.device, self._keep_device = self.pool.device, torch.device("cpu")
        self.blocks = BlockManager(num_blocks, kv_block_size, cached_blocks=ceil_div(prefix_cache_tokens, kv_block_size))
        pacer = PrefillPacer(prefill_chunk_tokens, prefill_time_share, prefill_step_ms / 1000)
        self.scheduler = Scheduler(
            self.blocks, self.pool, max_running=max_running, chunk_tokens=prefill_chunk_tokens, pacer=pacer
        )
        self.grammars = GrammarCompiler(self.template, self.model.config.get_text_config().vocab_size)
        # A row alone never outgrows the pool, so growing never has to preempt the last row.
        self.row_limit = min(self.context_length, self.scheduler.capacity_tokens())

        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []  # admission order (the newest is preempted first)
        self._aborts: set[str] = set()
        self._outbox = Outbox()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_blocks(self) -> tuple[int, int, int]:
        """Blocks in use, free, and (of the free ones) still holding cached prompt beginnings."""
        return self.blocks.num_used, self.blocks.num_free, self.blocks.num_cached

    # -- for a router over replicas (engines/replica_balancer.py); estimates, read from the event loop ---

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
            rows = [*self._running, *self._waiting]
        return sum(
            max(0, len(r.kv.ids) - r.kv.computed) + max(0, r.params.max_tokens - len(r.output_ids)) for r in rows
        )

    def cached_prefix_tokens(self, prompt_ids: list[int]) -> int:
        """Tokens at the start of ``prompt_ids`` that this engine's KV pool holds now."""
        with self._cv:
            try:
                return self.blocks.lookup(prompt_ids).tokens(self.blocks.block_size)
            except RuntimeError:  # the worker registered a block mid-lookup: no hint this time
                return 0

    # -- what it serves, and its tokenizer (any thread) ------------------------------------------

    def describe(self) -> EngineInfo:
        return EngineInfo(self.family, self.source, str(self.model.dtype))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.template.encode(text, add_special_tokens=True) for text in texts]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return self.template.convert_ids_to_tokens(ids)

    def decode(self, ids: list[int]) -> str:
        return self.template.decode(ids)

    @property
    def vocab_size(self) -> int | None:
        return self.model.get_input_embeddings().num_embeddings

    # -- client side (event loop) ------------------------------------------------------------

    def compile_constraint(self, constraint: Constraint) -> CompiledGrammar:
        """The grammar for a constraint (cached); blocking, so callers run it off the event loop.
        A constraint that cannot be enforced is a BadRequestError."""
        return self.grammars.compile(constraint)

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        self.check_health()
        if len(prompt_ids) >= self.row_limit:  # it could never get a token out of the pool
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; this server's KV cache holds at most "
                f"{self.row_limit} tokens of one request (--kv-cache-tokens)",
                param="messages",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        request = EngineRequest(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            loop=loop,
            queue=queue,
            detok=IncrementalDetokenizer(self.template.decode, params.stop),
            kv=RowKV(ids=list(prompt_ids)),
            stop_ids=self.template.stop_token_ids | frozenset(params.stop_token_ids),
            per_row=needs_per_row_sampling(params),
            matcher=params.grammar.matcher() if params.grammar is not None else None,
        )
        with self._cv:
            if self._queue_full():
                self.stats.rejected += 1
                raise RateLimitError(
                    f"the server is busy: {len(self._running)} sequences running and "
                    f"{len(self._waiting)} waiting; retry shortly",
                    retry_after=1,
                )
            self._waiting.append(request)
            self._cv.notify()
        return stream_output(queue, lambda: self.abort(request_id))

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    # -- worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        devices = ", ".join(map(str, dict.fromkeys(self.pool.layer_devices)))
        log.info("chat engine %s started on %s (max_running=%d)", self.model_name, devices, self.max_running)
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not (self._stopping or self._waiting or self._running or self._aborts):
                            self._cv.wait()
                        if self._stopping:
                            break
                        aborts, self._aborts = self._aborts, set()
                        self._drop_aborted(aborts)
                        plan = self.scheduler.schedule(self._running, self._waiting)
                        if not plan.rows:  # nothing fits yet (cannot last: rows only wait on rows)
                            self._cv.wait(timeout=0.05)
                            continue
                    self._admitted(plan)
                    try:
                        self._step(plan)
                    except torch.OutOfMemoryError:
                        self._out_of_memory(plan)
                    except Exception:  # one bad step must not kill the server
                        log.exception("chat engine step failed; failing %d running request(s)", len(self._running))
                        self._fail_running(InternalError("generation failed; see the server log"))
                    finally:
                        self._outbox.flush()
        except BaseException as exc:  # the thread itself is going down: say so to everyone
            self._dead = f"{type(exc).__name__}: {exc}"
            log.exception("chat engine thread died")
        finally:
            self._fail_all(EngineUnavailableError("the chat engine is shutting down"))

    def _drop_aborted(self, aborts: set[str]) -> None:
        """Caller holds the lock."""
        if not aborts:
            return
        for req in [r for r in self._waiting if r.request_id in aborts]:
            self._waiting.remove(req)
            self.scheduler.free(req.kv)
            self._finish(req, "abort")
        for req in [r for r in self._running if r.request_id in aborts]:
            self._running.remove(req)
            self.scheduler.free(req.kv)
            self._finish(req, "abort")

    def _admitted(self, plan: StepPlan) -> None:
        """Per-request state for rows starting now (a preempted row keeps what it had)."""
        self.stats.preemptions += len(plan.preempted)
        for req in plan.admitted:
            if req.started:
                continue
            req.started = True
            self.stats.prompt_tokens += len(req.prompt_ids)
            self.stats.cached_prompt_tokens += req.kv.cached or 0
            if req.params.seed is not None:
                req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)

    def _step(self, plan: StepPlan) -> None:
        started = time.perf_counter()
        rows = [
            ScheduledRow(req.kv.table, req.kv.computed, req.kv.ids[req.kv.computed : req.kv.computed + n])
            for req, n in plan.rows
        ]
        step = PagedStep.build(self.pool, rows)
        # Logits only where a row's last known token is computed: decode rows and finished prompts.
        sampling = [i for i, (req, n) in enumerate(plan.rows) if req.kv.computed + n == len(req.kv.ids)]
        keep = torch.tensor([step.last_index[i] for i in sampling], dtype=torch.long, device=self._keep_device)
        out = self.model(**step.model_inputs(), logits_to_keep=keep)
        self.scheduler.computed(plan.rows)
        prompt_tokens = sum(n for _, n in plan.rows if n > 1)
        decode_rows = sum(1 for _, n in plan.rows if n == 1)
        if sampling:
            self._advance([plan.rows[i][0] for i in sampling], out.logits[0])
        seconds = time.perf_counter() - started
        self.scheduler.pacer.observe(seconds, prompt_tokens, decode_rows)
        self.stats.step_seconds.observe(seconds)
        self.stats.steps += 1
        self.stats.prefills += any(n > 1 for _, n in plan.rows)
        self.stats.batch_size.observe(len(plan.rows))

    def _start_penalties(self, req: EngineRequest, vocab: int) -> None:
        if req.params.repetition_penalty != 1.0 and req.seen is None:
            req.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            ids = [i for i in req.prompt_ids if i < vocab]
            req.seen[torch.tensor(ids, dtype=torch.long, device=self.device)] = True
        if (req.params.presence_penalty or req.params.frequency_penalty) and req.counts is None:
            req.counts = torch.zeros(vocab, dtype=torch.int32, device=self.device)

    def _advance(self, rows: list[EngineRequest], logits: torch.Tensor) -> None:
        """Sample one token for each row, stream it, and retire rows that are done."""
        # Constrained rows first lose every token their grammar does not allow next. Then one
        # argmax and one device sync for the rows; rows with penalties or sampling replace their
        # entry (argmax of the same row's logits: batched greedy == alone).
        constrained = [i for i, req in enumerate(rows) if req.matcher is not None]
        if constrained:
            mask_logits(logits, constrained, [rows[i].matcher for i in constrained])
        tokens = logits.argmax(dim=-1).tolist()
        finished: list[EngineRequest] = []
        for i, req in enumerate(rows):
            if req.per_row:
                self._start_penalties(req, logits.shape[-1])
                row_logits = apply_penalties(logits[i].float(), req.params, req.seen, req.counts)
                tokens[i] = sample_token(row_logits, req.params, req.generator)
            token = tokens[i]
            if req.matcher is not None:
                req.matcher.consume_token(token)
            req.output_ids.append(token)
            req.kv.ids.append(token)
            if req.seen is not None:
                req.seen[token] = True
            if req.counts is not None:
                req.counts[token] += 1
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
                self.stats.ttft_seconds.observe(req.first_token_at - req.arrived)
            reason = self._finish_reason(req, token)
            text = req.detok.take(final=reason is not None)
            self._outbox.put(req, self._chunk(req, text, [token], reason))
            if reason is not None:
                self.stats.finished[reason] += 1
                finished.append(req)
        self.stats.tokens_generated += len(rows)
        if finished:
            with self._cv:
                for req in finished:
                    self._running.remove(req)
                    self.scheduler.free(req.kv)

    def _finish(self, req: EngineRequest, reason: str) -> None:
        self.stats.finished[reason] += 1
        self._outbox.put(req, self._chunk(req, "", [], reason))

    def _finish_reason(self, req: EngineRequest, token: int) -> str | None:
        if token in req.stop_ids:  # counted as generated, never decoded into the text
            return "stop"
        if req.matcher is not None and req.matcher.is_stopped():  # the grammar is complete
            req.detok.push(token)
            return "stop"
        if req.detok.push(token):
            return "stop"
        if len(req.output_ids) >= req.params.max_tokens:
            return "length"
        if len(req.prompt_ids) + len(req.output_ids) >= self.row_limit:
            return "length"
        return None

    @staticmethod
    def _chunk(req: EngineRequest, text: str, ids: list[int], reason: str | None) -> GenerationChunk:
        return GenerationChunk(
            text=text,
            token_ids=ids,
            finish_reason=reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.kv.cached or 0,
        )

    def _out_of_memory(self, plan: StepPlan) -> None:
        """A device out-of-memory error in a step fails the rows whose prompt chunks it carried
        (or, with none, the newest row); the others lose nothing (their counts did not move)
        and go on next step."""
        chunked = [req for req, n in plan.rows if n > 1] or [plan.rows[-1][0]]
        log.error("out of device memory in a step of %d rows; failing %d request(s)", len(plan.rows), len(chunked))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        error = EngineUnavailableError("out of device memory for this request; retry later or send a shorter prompt")
        with self._cv:
            for req in chunked:
                if req in self._running:
                    self._running.remove(req)
                self.scheduler.free(req.kv)
                self._outbox.put(req, error)

    def _fail_running(self, error: BaseException) -> None:
        with self._cv:
            running, self._running = self._running, []
        for req in running:
            self.scheduler.free(req.kv)
            self._outbox.put(req, error)

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            running, self._running = self._running, []
        for req in waiting + running:
            self._outbox.put(req, error)
        self._outbox.flush()
