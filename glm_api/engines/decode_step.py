"""The decode step: a step in which every row adds one token, run lean (issue 24).

Decoding one token reads every weight once; what a step costs beyond that is work around the
weights: Python dispatch of every small op of every layer, index tensors rebuilt per layer, the
paged gathers. A decode-only step therefore takes its own path, apart from the general packed
step of :mod:`paged_attention` (which prompt chunks still take):

- :class:`DecodeBatch`: the step as a few tensors built once (ids, positions, the slots the new
  keys/values go to, each row's block table and length); rows sorted by length so that rows
  of similar length share one gather;
- :func:`paged_decode_attention`: one custom op per layer that writes the new keys/values into
  the pool and attends each row over its own blocks (opaque to the compiler, so the paged
  gathers stay eager C++ calls inside a compiled graph);
- :class:`DecodeStep`: the model's forward over such a batch, optionally through
  ``torch.compile`` (inductor) with the rows padded to a few bucket sizes, so that a steady
  decode never recompiles, warmed up at start-up for the buckets in use; on CUDA each bucket's
  step is captured as a CUDA graph over static input buffers and replayed.

Two attention modes: *grouped* (CPU, no graph): the op reads the lengths on the host and cuts
the rows into runs whose padding stays small, as the general step does; *static* (a captured
graph): one gather over the table's whole width (the graph's width bucket), masked by length,
with no host reads, so capture and replay see the same work. CPU tests run the static mode
through the same buffers as the CUDA path, without the capture itself.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable
from collections.abc import Sequence as Seq
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glm_api.engines.direct_decode import DirectDecoder
from glm_api.engines.kv_blocks import NULL_BLOCK
from glm_api.engines.kv_pool import KVPool
from glm_api.units import ceil_div

log = logging.getLogger(__name__)

#: In grouped mode a run of rows grows while its padded keys stay under this factor of its
#: real keys (plus slack): one gather for similar rows, separate ones for very different ones.
GROUP_PADDING = 1.5
GROUP_SLACK_TOKENS = 256
#: Table widths (in blocks) a captured graph is made for: powers of two from this.
MIN_GRAPH_BLOCKS = 8


def decode_options(compile_decode: str, cuda_graphs: str, device: torch.device) -> tuple[bool, bool]:
    """(compiled, graphs) for the settings ``auto|on|off`` on ``device``. ``auto``: both on for
    CUDA; on a CPU the eager step: compiling cost ~45 s of start-up per row bucket for SmolLM2
    on the 2-core dev CPU, for a gain its load did not let us measure reliably (README, "Decode
    step"). CUDA graphs exist only on CUDA."""
    cuda = device.type == "cuda"
    compiled = compile_decode == "on" or (compile_decode == "auto" and cuda)
    graphs = cuda and (cuda_graphs == "on" or (cuda_graphs == "auto"))
    return compiled, graphs


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """Batch sizes decode rows are padded to: powers of two up to ``max_rows`` (and it)."""
    sizes, n = [], 1
    while n < max_rows:
        sizes.append(n)
        n *= 2
    sizes.append(max_rows)
    return tuple(sizes)


def bucket_for(rows: int, buckets: Seq[int]) -> int:
    return next(b for b in buckets if b >= rows)


# -- attention ----------------------------------------------------------------------------------


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    static: bool,
    groups: list[tuple[int, int, int, int, bool]] | None = None,
) -> torch.Tensor:
    """``query`` ``[1, H, B, d]``, ``key``/``value`` ``[1, kv_heads, B, d]`` of B decode rows
    (sorted by length); writes the keys/values at ``slots`` of the pool ``[kv_heads, blocks,
    block_size, d]``, then attends row r over the first ``lengths[r]`` tokens of its blocks
    ``tables[r]``. Returns ``[1, B, H, d]``. ``groups``: the runs of rows gathered together
    when the caller has them (one step's layers share them), else read from ``lengths``."""
    kv_heads, _, block_size, d = k_pool.shape
    heads, rows = query.shape[1], query.shape[2]
    k_pool.view(kv_heads, -1, d).index_copy_(1, slots, key[0].to(k_pool.dtype))
    v_pool.view(kv_heads, -1, d).index_copy_(1, slots, value[0].to(v_pool.dtype))
    if static:
        groups = [(0, rows, tables.shape[1], tables.shape[1] * block_size, True)]
    elif groups is None:
        groups = _groups(lengths.tolist(), block_size)
    out = query.new_empty((1, rows, heads, d)) if len(groups) > 1 else None
    for start, count, n_blocks, kv_len, masked in groups:
        width = n_blocks * block_size
        index = tables[start : start + count, :n_blocks].reshape(-1)
        # Keys past the group's longest row are cut off, not masked: a lone row needs no mask.
        k = k_pool.index_select(1, index).view(kv_heads, count, width, d)[:, :, :kv_len].transpose(0, 1)
        v = v_pool.index_select(1, index).view(kv_heads, count, width, d)[:, :, :kv_len].transpose(0, 1)
        q = query[0, :, start : start + count].transpose(0, 1).unsqueeze(2)
        mask = None
        if masked:
            keys = torch.arange(kv_len, device=lengths.device)
            mask = (keys < lengths[start : start + count, None])[:, None, None, :]
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads)
        if out is None:  # one group: its output is the layer's
            return o.squeeze(2).unsqueeze(0)
        out[0, start : start + count] = o.squeeze(2)
    return out


def _groups(lengths: list[int], block_size: int) -> list[tuple[int, int, int, int, bool]]:
    """Runs of rows (sorted by length) gathered together: (start, rows, blocks, keys of the
    longest row, whether shorter rows need a mask)."""
    out: list[tuple[int, int, int, int, bool]] = []
    start, total = 0, 0
    for i, length in enumerate(lengths):
        count = i - start
        if count and (count + 1) * length > GROUP_PADDING * (total + length) + GROUP_SLACK_TOKENS:
            out.append(_group(lengths, start, i, block_size))
            start, total = i, 0
        total += length
    out.append(_group(lengths, start, len(lengths), block_size))
    return out


def _group(lengths: list[int], start: int, end: int, block_size: int) -> tuple[int, int, int, int, bool]:
    longest = max(lengths[start:end])
    return start, end - start, ceil_div(longest, block_size), longest, min(lengths[start:end]) != longest


@torch.library.custom_op("glm_api::paged_decode_attention", mutates_args=("k_pool", "v_pool"))
def paged_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    static: bool,
) -> torch.Tensor:
    """:func:`decode_attention` as an op the compiler keeps whole (it reads lengths on the host
    and writes the pool in place); contiguous, as its fake kernel says."""
    return decode_attention(query, key, value, k_pool, v_pool, slots, tables, lengths, scale, static).contiguous()


@paged_decode_attention.register_fake
def _(query, key, value, k_pool, v_pool, slots, tables, lengths, scale, static):
    return query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))


@dataclass
class DecodeBatch:
    """One decode step as tensors (``B`` rows, padded ones included), passed to the model as the
    ``paged_decode`` keyword that reaches every attention layer."""

    input_ids: torch.Tensor  # [1, B]
    positions: torch.Tensor  # [1, B]
    slots: torch.Tensor  # [B] where each row's new key/value goes
    tables: torch.Tensor  # [B, W] block ids (NULL_BLOCK past a row's blocks)
    lengths: torch.Tensor  # [B] keys each row attends to (its new token included)
    keys: list[torch.Tensor]  # the pool, per layer
    values: list[torch.Tensor]
    static: bool  # one masked gather over the whole width (graph capture), no host reads
    groups: list[tuple[int, int, int, int, bool]] | None = None  # eager: the runs of rows, made once a step

    def attend(self, layer: int, query, key, value, scale: float) -> torch.Tensor:
        args = (query, key, value, self.keys[layer], self.values[layer], self.slots, self.tables, self.lengths)
        if torch.compiler.is_compiling():
            return paged_decode_attention(*args, scale, self.static)
        return decode_attention(*args, scale, self.static, self.groups)  # eager: no op dispatch per layer


@dataclass
class DecodeRows:
    """The host side of a decode step: rows sorted by length, padded to a bucket."""

    order: list[int]  # scheduled index of each real row, in batch order (after the padding rows)
    pad: int  # padding rows at the front (length 1, writing into the null block)
    ids: list[int]
    positions: list[int]
    slots: list[int]
    lengths: list[int]
    tables: list[list[int]]
    blocks: int  # the longest table

    @classmethod
    def build(cls, rows: Seq[tuple[list[int], int, int]], bucket: int, block_size: int) -> DecodeRows:
        """``rows``: (block table, tokens in the pool, new token id) per scheduled row."""
        order = sorted(range(len(rows)), key=lambda i: rows[i][1])
        pad = bucket - len(rows)
        ids, positions, slots, lengths, tables = [0] * pad, [0] * pad, [0] * pad, [1] * pad, [[NULL_BLOCK]] * pad
        for i in order:
            table, past, token = rows[i]
            ids.append(token)
            positions.append(past)
            slots.append(table[past // block_size] * block_size + past % block_size)
            lengths.append(past + 1)
            tables.append(table[: ceil_div(past + 1, block_size)])
        return cls(order, pad, ids, positions, slots, lengths, tables, max(map(len, tables)))

    def table_tensor(self, width: int) -> torch.Tensor:
        """``[rows, width]`` block ids, :data:`NULL_BLOCK` past each row's blocks: the rows are
        copied into one flat buffer by slices, not made a nested list for ``torch.tensor`` (32
        rows of 500 blocks: 0.94 -> 0.27 ms a step, host time every batched step pays)."""
        rows = len(self.tables)
        flat = array("q", [NULL_BLOCK]) * (rows * width)
        for i, table in enumerate(self.tables):
            flat[i * width : i * width + len(table)] = array("q", table)
        return torch.frombuffer(flat, dtype=torch.long).view(rows, width)  # the tensor keeps flat alive

    def row_tensor(self) -> torch.Tensor:
        """``[4, rows]``: ids, positions, slots and lengths in one host tensor (one copy to a
        device, not four)."""
        flat = array("q", self.ids)
        for column in (self.positions, self.slots, self.lengths):
            flat.extend(column)
        return torch.frombuffer(flat, dtype=torch.long).view(4, len(self.ids))


class _StaticInputs:
    """Input buffers of one captured graph (a row bucket and a table width): a step copies its
    rows in, the graph reads them where it was captured reading them."""

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        # ids, positions, slots (0: the null block) and lengths (1), filled by one copy
        self.rows = torch.zeros((4, rows), dtype=torch.long, device=device)
        self.rows[3] = 1
        self.input_ids, self.positions = self.rows[0:1], self.rows[1:2]
        self.slots, self.lengths = self.rows[2], self.rows[3]
        self.tables = torch.full((rows, width), NULL_BLOCK, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer

    def fill(self, host: DecodeRows) -> None:
        self.rows.copy_(host.row_tensor(), non_blocking=True)
        self.tables.copy_(host.table_tensor(self.tables.shape[1]), non_blocking=True)


class DecodeStep:
    """The forward of decode-only steps, for :class:`~glm_api.engines.model_runner.ModelRunner`.

    ``compiled``: through ``torch.compile`` (inductor), one graph per row bucket; ``graphs``:
    every (row bucket, table width) step as a captured graph over static buffers (CUDA: the
    capture; elsewhere the same buffers and masked attention without one, which is what CPU
    tests exercise)."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, *, max_rows: int, compiled: bool, graphs: bool) -> None:
        self.model, self.pool = model, pool
        self.device = pool.device
        self.buckets = row_buckets(max_rows)
        self.compiled, self.graphs = compiled, graphs
        self._capture = graphs and self.device.type == "cuda"
        self._static: dict[tuple[int, int], _StaticInputs] = {}
        self._graph_pool = None
        self.steps = 0  # decode steps run (warm-up included)
        self.warm_up_seconds = 0.0  # what warm_up took (compiling, capturing)
        self._placeholder = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        # The model's layers computed directly (no per-module dispatch) where its layout allows.
        self.direct = DirectDecoder.for_model(model)
        self._forward = self._eager_forward
        if compiled:
            # One graph per row bucket (and table width, for graphs): dynamo counts the graphs
            # of every instance of this method against one limit, so each instance adds its own.
            torch._dynamo.config.recompile_limit += 2 * len(self.buckets) * (8 if graphs else 1)
            self._forward = torch.compile(self._eager_forward, dynamic=False, fullgraph=True)

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def _eager_forward(self, batch: DecodeBatch, hooks: bool = False) -> torch.Tensor:
        if self.direct is not None and not hooks:
            return self.direct(batch)
        out = self.model(
            input_ids=batch.input_ids,
            position_ids=batch.positions,
            attention_mask=self._placeholder,  # 4D: transformers builds no mask (attention masks itself)
            use_cache=False,
            paged_decode=batch,
        )
        return out.logits[0]

    def run(
        self, rows: Seq[tuple[list[int], int, int]], around: Callable[[list[int]], AbstractContextManager] | None = None
    ) -> torch.Tensor:
        """Logits ``[len(rows), V]`` of one decode token of each row, in the order given (rows
        run sorted by length: put back with one copy only when that changed their order).
        ``around``: given each row's token index in the batch, the context the forward runs in
        (LoRA's per-token routing); eager steps only (a compiled or captured graph would not see it)."""
        self.steps += 1
        # Only a compiled graph or a captured one needs a fixed batch size: eager steps run the
        # rows there are (a padding row would cost a row of every matmul and its attention).
        bucket = bucket_for(len(rows), self.buckets) if self.compiled or self.graphs else len(rows)
        host = DecodeRows.build(rows, bucket, self.pool.block_size)
        where = [0] * len(rows)
        for j, i in enumerate(host.order):
            where[i] = host.pad + j
        context = around(where) if around is not None else nullcontext()
        with context:
            if self.graphs:
                logits = self._run_static(host, bucket)
            elif around is not None:  # the adapters' hooks run only in the model's own forward
                logits = self._eager_forward(self._batch(host), hooks=True)
            else:
                logits = self._forward(self._batch(host))
        if host.order == sorted(host.order):
            return logits[host.pad :]
        return logits.index_select(0, torch.tensor(where, device=logits.device))

    def _batch(self, host: DecodeRows) -> DecodeBatch:
        d = self.device
        # The table's width varies from step to step: only the attention op reads it, so the
        # compiled graph takes it as a symbolic size (at least 2: a size of 1 would be specialised).
        tables = host.table_tensor(max(2, host.blocks)).to(d)
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(tables, 1)
        rows = host.row_tensor().to(d)
        return DecodeBatch(
            input_ids=rows[0:1],
            positions=rows[1:2],
            slots=rows[2],
            tables=tables,
            lengths=rows[3],
            keys=self.pool.keys,
            values=self.pool.values,
            static=False,
            # from the host's lengths: no per-layer read of the lengths tensor (a compiled graph
            # calls the op, which reads them itself)
            groups=None if self.compiled else _groups(host.lengths, self.pool.block_size),
        )

    def _run_static(self, host: DecodeRows, bucket: int) -> torch.Tensor:
        width = MIN_GRAPH_BLOCKS
        while width < host.blocks:
            width *= 2
        key = (bucket, width)
        inputs = self._static.get(key)
        if inputs is None:
            inputs = self._static[key] = _StaticInputs(bucket, width, self.device)
        inputs.fill(host)
        batch = DecodeBatch(
            inputs.input_ids, inputs.positions, inputs.slots, inputs.tables, inputs.lengths,
            self.pool.keys, self.pool.values, static=True,
        )
        if not self._capture:
            return self._forward(batch)
        if inputs.graph is None:
            inputs.graph, inputs.logits = self._capture_graph(batch)
        inputs.graph.replay()
        return inputs.logits

    def _capture_graph(self, batch: DecodeBatch) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the step over ``batch``'s static buffers (after warm-up runs on a side stream,
        as CUDA graphs need); the padding rows write into the null block, never a live one."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._forward(batch)
        self._graph_pool = graph.pool()  # the graphs share one memory pool
        return graph, logits

    def warm_up(self, max_rows: int | None = None) -> float:
        """Run (compile; capture) a decode step of each row bucket up to ``max_rows`` on the null
        block, so that no request waits for it; returns the seconds it took."""
        started = time.perf_counter()
        with torch.inference_mode():
            for bucket in self.buckets:
                if max_rows is not None and bucket > max_rows:
                    break
                rows = [([NULL_BLOCK], 0, 0)] * bucket  # writes slot 0 of the null block only
                self.run(rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = self.warm_up_seconds = time.perf_counter() - started
        log.info(
            "decode step warmed up for %d row buckets (%s%s) in %.1f s",
            len(self.buckets), "compiled" if self.compiled else "eager", ", CUDA graphs" if self._capture else "",
            seconds,
        )
        return seconds
