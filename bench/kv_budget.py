"""KV cache budget of ChatGLM3-6B-32k on 24, 40 and 80 GB GPUs in bfloat16: arithmetic, no GPU.

    python bench/kv_budget.py
    python bench/kv_budget.py --gpus 24,48,80 --utilization 0.85

The weights are counted from the architecture's shapes; the KV pool is sized by the engine's
own functions (glm_api.engines.kv_pool: KVShape, step_reserve_bytes, kv_tokens_for_memory) with
the server's defaults (glm_api.config.Settings: prefill chunk, max running, block size,
utilization), so this prints what the server would reserve at start-up, less what it measures
there and this cannot: the CUDA context and other non-torch memory (typically 0.3-1 GiB).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import print_table
from glm_api.config import Settings
from glm_api.kv_memory import KVShape, kv_tokens_for_memory, step_reserve_bytes

GB, GIB = 10**9, 2**30


@dataclass(frozen=True)
class ChatGLM3:
    """THUDM/chatglm3-6b-32k's config.json (the fields that size it)."""

    num_layers: int = 28
    hidden_size: int = 4096
    num_attention_heads: int = 32
    multi_query_group_num: int = 2  # KV heads
    kv_channels: int = 128  # head_dim
    ffn_hidden_size: int = 13696
    padded_vocab_size: int = 65024
    seq_length: int = 32768

    def parameters(self) -> dict[str, int]:
        h, d = self.hidden_size, self.kv_channels
        qkv_out = (self.num_attention_heads + 2 * self.multi_query_group_num) * d
        per_layer = (
            h * qkv_out + qkv_out  # query_key_value, with bias
            + self.num_attention_heads * d * h  # dense (no bias)
            + h * 2 * self.ffn_hidden_size  # dense_h_to_4h: gate and up
            + self.ffn_hidden_size * h  # dense_4h_to_h
            + 2 * h  # input_layernorm, post_attention_layernorm (RMSNorm weights)
        )
        return {
            "embedding": self.padded_vocab_size * h,
            "output_layer": self.padded_vocab_size * h,  # not tied to the embedding
            f"{self.num_layers} layers": self.num_layers * per_layer,
            "final_layernorm": h,
        }

    def kv_shape(self, dtype: torch.dtype) -> KVShape:
        return KVShape(self.num_layers, self.multi_query_group_num, self.kv_channels, dtype)


def main() -> int:
    defaults = Settings.model_fields
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="24,40,80", help="GPU memory sizes in GB (10^9 bytes), comma-separated")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--utilization", type=float, default=defaults["gpu_memory_utilization"].default)
    p.add_argument("--prefill-chunk-tokens", type=int, default=defaults["prefill_chunk_tokens"].default)
    p.add_argument("--max-running", type=int, default=defaults["max_running"].default)
    p.add_argument("--block-size", type=int, default=defaults["kv_block_size"].default)
    args = p.parse_args()

    model, dtype = ChatGLM3(), getattr(torch, args.dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    params = model.parameters()
    n_params = sum(params.values())
    weights = n_params * dtype_bytes
    shape = model.kv_shape(dtype)
    bpt = shape.bytes_per_token
    step_tokens = args.prefill_chunk_tokens + args.max_running
    reserve = step_reserve_bytes(step_tokens, model.hidden_size, dtype)
    context = model.seq_length
    old_window = args.max_running * context * bpt

    print(f"ChatGLM3-6B-32k in {args.dtype}: {n_params:,} parameters ("
          + ", ".join(f"{k} {v:,}" for k, v in params.items()) + ")")
    print(f"weights {weights / GIB:.2f} GiB ({weights / GB:.2f} GB)")
    print(f"KV per token: 2 x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} x {dtype_bytes} bytes "
          f"= {bpt:,} bytes; one full {context}-token context = {context * bpt / GIB:.2f} GiB")
    print(f"step reserve: step_reserve_bytes({step_tokens} = chunk {args.prefill_chunk_tokens} + max_running "
          f"{args.max_running}, hidden {model.hidden_size}) = {reserve / GIB:.2f} GiB")
    print(f"KV tokens = (GPU x {args.utilization} - weights - reserve) // {bpt}, rounded down to whole "
          f"{args.block_size}-token blocks; GPU sizes are N x 10^9 bytes (cards sold as 24/40/80 GB "
          f"report about 7% more: 24 GiB, 40 GiB, 80 GiB)")
    print(f"old window layout: {args.max_running} rows padded to one {context}-token conversation = "
          f"{args.max_running} x {context} x {bpt} = {old_window / GIB:.1f} GiB of KV, whatever the rows hold")
    print()

    rows = []
    for size in (float(g) for g in args.gpus.split(",")):
        total = int(size * GB)
        tokens = kv_tokens_for_memory(total, weights, args.utilization, reserve, bpt)
        tokens = tokens // args.block_size * args.block_size
        fits = [tokens // n for n in (context, 8192, 2048)]
        window_fits = weights + reserve + old_window <= total * args.utilization
        rows.append([
            f"{size:g} GB", weights / GIB, tokens * bpt / GIB, f"{tokens:,}", tokens // args.block_size,
            *(f"{n}" + (f" (runs {args.max_running})" if n > args.max_running else "") for n in fits),
            f"{old_window / GIB:.1f} GiB: " + ("fits" if window_fits else "does not fit"),
        ])
    print_table(["GPU", "weights GiB", "KV pool GiB", "KV tokens", "blocks", "rows at 32k", "rows at 8k",
                 "rows at 2k", "old window (32 x 32k)"], rows)
    print()
    print(f"rows: whole contexts (prompt + answer) the pool holds at once; at most --max-running "
          f"({args.max_running}) decode together, the rest wait in the queue.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
