"""The model runner: one engine step as one forward of the model over the paged KV pool.

It owns what the device sees: the model, its device and dtype, and the KV pool's tensors. Given
the scheduler's plan (each sequence and how many of its tokens to compute), it packs the new
tokens of every sequence into one ``[1, T]`` step (:class:`~glm_api.engines.paged_attention.
PagedStep`: positions, the slots the new keys/values go to, the attention groups), runs the
forward, and returns the logits of the sequences that sample a token now (decoding ones, and
prompts whose last chunk this is), and of every position computed for a sequence that scores
its prompt (``Sequence.scores_prompt``: prompt log-probabilities); no other position's logits
are ever computed. Nothing else in the engine calls the model: a compiled or
graph-captured step, or another attention backend, plugs in here (nano-vllm's and vLLM's
``ModelRunner``).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from glm_api.engines.cache_layout import probe_layout
from glm_api.engines.decode_step import DecodeStep
from glm_api.engines.kv_pool import KVPool, layer_devices, size_pool
from glm_api.engines.lora import LoraLayers
from glm_api.engines.paged_attention import PagedStep, ScheduledRow, install
from glm_api.engines.sequence import Sequence


@dataclass
class StepOutput:
    """``sampling[i]`` is the index (in the plan) of the sequence whose next-token logits are
    ``logits[i]``; ``logits`` is None when no sequence samples this step. ``scored`` maps the
    index of a sequence that scores its prompt to the logits ``[n, V]`` of each of the ``n``
    positions this step computed for it (in order)."""

    sampling: list[int]
    logits: torch.Tensor | None
    scored: dict[int, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    """``max_decode_rows``: decode-only steps up to this many rows take the lean decode step
    (:mod:`decode_step`), compiled with ``compile_decode``, captured as CUDA graphs with
    ``decode_graphs`` (CUDA only: elsewhere the same static buffers without a capture)."""

    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        *,
        max_decode_rows: int = 32,
        compile_decode: bool = False,
        decode_graphs: bool = False,
    ) -> None:
        install(model)
        self.model = model
        self.pool = pool
        self.device = next(model.parameters()).device
        self._keep_device = self.device
        # LoRA adapters, per row (engines/lora.py); None until the first adapter loads.
        self.lora: LoraLayers | None = None
        self.decode: DecodeStep | None = None
        split = hasattr(model, "_hf_hook")
        if split:  # split over devices (glm_api/device_map.py)
            # Steps are built on the first layer's device and the hooks bring the logits back
            # there; the last hidden states stay on the last device, so the rows to keep are
            # picked with an index on the CPU (one that any device's tensor accepts).
            self.device, self._keep_device = pool.device, torch.device("cpu")
        elif max_decode_rows > 0 and _lean_decode_fits(model, pool):
            self.decode = DecodeStep(
                model, pool, max_rows=max_decode_rows, compiled=compile_decode, graphs=decode_graphs
            )

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        model_name: str,
        *,
        context_length: int,
        block_size: int,
        kv_cache_tokens: int | None,
        gpu_memory_utilization: float,
        step_tokens: int,
        **options: Any,
    ) -> ModelRunner:
        """The runner with a pool sized for ``model``'s cache entries, as a probe forward finds them
        (each layer's beside it: all on one device, unless the model is split);
        :class:`~glm_api.engines.cache_layout.UnsupportedCacheError` for a cache it cannot hold."""
        layout = probe_layout(model)
        devices = layer_devices(model, layout.num_layers)
        num_blocks = size_pool(
            layout,
            devices,
            block_size=block_size,
            kv_cache_tokens=kv_cache_tokens,
            context_length=context_length,
            gpu_memory_utilization=gpu_memory_utilization,
            step_tokens=step_tokens,
            hidden_size=model.config.get_text_config().hidden_size,
            model_name=model_name,
        )
        return cls(model, KVPool(layout, num_blocks, block_size, devices), **options)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    def execute(self, scheduled: Seq[tuple[Sequence, int]]) -> StepOutput:
        """One forward over ``n`` new tokens of each sequence (their blocks are allocated and
        their ``num_computed_tokens`` not yet advanced)."""
        if self._all_decoding(scheduled):
            rows = [(seq.block_table, seq.num_computed_tokens, seq.token_ids[-1]) for seq, _ in scheduled]
            lora, around = self.lora, None
            if lora is not None and any(seq.adapter is not None for seq, _ in scheduled):
                # each row's one token, wherever the step put the row
                around = lambda where: lora.step([(seq.adapter, where[i], 1) for i, (seq, _) in enumerate(scheduled)])
            return StepOutput(list(range(len(rows))), self.decode.run(rows, around))
        rows = []
        for seq, n in scheduled:
            past = seq.num_computed_tokens
            new_ids = seq.token_ids[past : past + n]
            if seq.prefix is None:
                rows.append(ScheduledRow(seq.block_table, past, new_ids))
            else:  # its pinned prefix's blocks head its table: attended first, shared by every row
                prefix = seq.prefix
                table = [*prefix.blocks, *seq.block_table]
                rows.append(ScheduledRow(table, past, new_ids, prefix.slots(self.pool.block_size), prefix.hidden))
        step = PagedStep.build(self.pool, rows)
        # Logits only where a sequence's last known token is computed: decoding ones and finished prompts.
        sampling = [i for i, (seq, n) in enumerate(scheduled) if seq.num_computed_tokens + n == len(seq.token_ids)]
        positions = [step.last_index[i] for i in sampling]
        spans: dict[int, tuple[int, int]] = {}
        for i, (seq, n) in enumerate(scheduled):
            if seq.scores_prompt:  # a row's new tokens are packed together, ending at its last index
                spans[i] = (len(positions), n)
                positions += range(step.last_index[i] - n + 1, step.last_index[i] + 1)
        keep = torch.tensor(positions, dtype=torch.long, device=self._keep_device)
        lora = self.lora
        adapters = nullcontext()
        if lora is not None:  # each row's tokens are one run ending at its last index (the step orders rows its way)
            adapters = lora.step([(seq.adapter, step.last_index[i] - n + 1, n) for i, (seq, n) in enumerate(scheduled)])
        with adapters:
            out = self.model(**step.model_inputs(), logits_to_keep=keep)
        if not positions:
            return StepOutput(sampling, None)
        logits = out.logits[0]
        scored = {i: logits[start : start + n] for i, (start, n) in spans.items()}
        return StepOutput(sampling, logits[: len(sampling)] if sampling else None, scored)


    def _all_decoding(self, scheduled: Seq[tuple[Sequence, int]]) -> bool:
        """Whether the lean decode step can run this plan: every row adds its one last token,
        none scores its prompt (the general step returns per-position logits), none runs under a LoRA
        adapter in a compiled step and none sits behind a pinned prefix (the general step offsets its positions and masks its padding)."""
        if self.decode is None or len(scheduled) > self.decode.max_rows:
            return False
        return all(
            n == 1 and seq.num_computed_tokens + 1 == len(seq.token_ids) and not seq.scores_prompt
            and seq.prefix is None  # a pinned P-Tuning prefix: its keys come first, its padding masked
            # LoRA rows: their routing runs beside an eager step only (a compiled graph would not see it)
            and (seq.adapter is None or not (self.decode.compiled or self.decode.graphs))
            for seq, n in scheduled
        )


def _lean_decode_fits(model: torch.nn.Module, pool: KVPool) -> bool:
    """The lean decode step attends over whole rows of a key/value pool: not for sliding windows,
    nor for latent or indexer layouts (their layers read a history the pool rebuilds)."""
    layout = pool.layout
    return not _has_sliding_window(model) and not layout.indexed and all(layer.direct for layer in layout.layers)


def _has_sliding_window(model: torch.nn.Module) -> bool:
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None) or ()
    return bool(getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)) or any(
        "sliding" in str(t) for t in types
    )
