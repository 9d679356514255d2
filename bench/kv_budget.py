"""KV cache budget of ChatGLM3-6B-32k on 24, 40 and 80 GB GPUs in bfloat16, then of the GLM MoE
architectures (GLM-4.5-Air, GLM-4.7-Flash, GLM-5) on one 80 GB GPU with bf16 and int4 weights:
arithmetic, no GPU.

    python bench/kv_budget.py
    python bench/kv_budget.py --gpus 24,48,80 --utilization 0.85

The MoE models are built on the meta device from their published config.json values (the fields
that size them: ARCHITECTURES), so parameters are counted by transformers' own classes, and their
int4 weights by this server's quantisation policy (glm_api.families.quantize.replace_modules:
every projection and routed expert int4, embedding and output layer int8, norms and routers as
they are). KV bytes per token come from glm_api.kv_memory.layer_cache_bytes, which the tests
check against what each layer really hands to the cache.

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
from glm_api.kv_memory import KVShape, kv_tokens_for_memory, layer_cache_bytes, step_reserve_bytes

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


@dataclass(frozen=True)
class MoeArchitecture:
    """A published GLM MoE model's shape: its transformers config class and config.json values."""

    name: str
    config_class: str
    values: tuple[tuple[str, object], ...]

    def config(self):
        import transformers

        return getattr(transformers, self.config_class)(**dict(self.values))

    def meta_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config(), dtype=torch.bfloat16)


ARCHITECTURES = {
    "glm4": MoeArchitecture("GLM-4-32B-0414 (dense)", "Glm4Config", (
        ("vocab_size", 151552), ("hidden_size", 6144), ("intermediate_size", 23040), ("num_hidden_layers", 61),
        ("num_attention_heads", 48), ("num_key_value_heads", 2), ("head_dim", 128), ("partial_rotary_factor", 0.5),
        ("attention_bias", True), ("tie_word_embeddings", False), ("max_position_embeddings", 32768),
    )),
    "glm4_moe": MoeArchitecture("GLM-4.5-Air (106B, A12B)", "Glm4MoeConfig", (
        ("vocab_size", 151552), ("hidden_size", 4096), ("intermediate_size", 10944), ("moe_intermediate_size", 1408),
        ("num_hidden_layers", 46), ("num_attention_heads", 96), ("num_key_value_heads", 8), ("head_dim", 128),
        ("n_routed_experts", 128), ("n_shared_experts", 1), ("num_experts_per_tok", 8), ("first_k_dense_replace", 1),
        ("partial_rotary_factor", 0.5), ("attention_bias", True), ("use_qk_norm", False), ("tie_word_embeddings", False),
        ("max_position_embeddings", 131072),
    )),
    "glm4_moe_lite": MoeArchitecture("GLM-4.7-Flash (30B, A3B)", "Glm4MoeLiteConfig", (
        ("vocab_size", 154880), ("hidden_size", 2048), ("intermediate_size", 10240), ("moe_intermediate_size", 1536),
        ("num_hidden_layers", 47), ("num_attention_heads", 20), ("num_key_value_heads", 20), ("kv_lora_rank", 512),
        ("q_lora_rank", 768), ("qk_rope_head_dim", 64), ("qk_nope_head_dim", 192), ("v_head_dim", 256),
        ("n_routed_experts", 64), ("n_shared_experts", 1), ("num_experts_per_tok", 4), ("first_k_dense_replace", 1),
        ("tie_word_embeddings", False), ("max_position_embeddings", 202752),
    )),
    "glm_moe_dsa": MoeArchitecture("GLM-5 (744B, A40B)", "GlmMoeDsaConfig", (
        ("vocab_size", 154880), ("hidden_size", 6144), ("intermediate_size", 12288), ("moe_intermediate_size", 2048),
        ("num_hidden_layers", 78), ("num_attention_heads", 64), ("num_key_value_heads", 64), ("kv_lora_rank", 512),
        ("q_lora_rank", 2048), ("qk_rope_head_dim", 64), ("qk_nope_head_dim", 192), ("v_head_dim", 256),
        ("n_routed_experts", 256), ("n_shared_experts", 1), ("num_experts_per_tok", 8), ("first_k_dense_replace", 3),
        ("index_topk", 2048), ("index_head_dim", 128), ("index_n_heads", 32), ("tie_word_embeddings", False),
        ("max_position_embeddings", 202752),
    )),
}


def _quantized_module_bytes(module: torch.nn.Module) -> int:
    """What a quantised module holds once loaded (its buffers are still empty on meta)."""
    from glm_api.families import quantized_modules as q

    out, inp = module.weight_shape
    if isinstance(module, q.Int4Linear):  # two codes a byte; a bf16 scale and zero per group and row
        return out * inp // 2 + inp // module.group_size * out * 2 * 2
    if isinstance(module, q.Int8Linear):  # codes; float32 scale and its bf16 copy per row
        return out * inp + out * (4 + 2)
    return out * inp + out * 2  # Int8Embedding: codes and a bf16 scale per row


def weight_bytes(arch: MoeArchitecture, mode: str) -> int:
    """Bytes of the model's weights in bf16, or quantised as ``--quantize int4|int8`` does."""
    from glm_api.families.quantize import replace_modules
    from glm_api.families.quantized_modules import QUANTIZED

    model = arch.meta_model()
    if mode != "bf16":
        replace_modules(model, mode, torch.device("cuda"), torch.bfloat16)  # meta: nothing is allocated
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    return dense + sum(_quantized_module_bytes(m) for m in model.modules() if isinstance(m, QUANTIZED))


def moe_table(gpu_gb: float, utilization: float, step_tokens: int, context: int, block_size: int) -> None:
    total = int(gpu_gb * GB)
    rows = []
    for key, arch in ARCHITECTURES.items():
        config = arch.config()
        per_layer = layer_cache_bytes(config, torch.bfloat16)
        bpt = sum(per_layer)
        params = sum(p.numel() for p in arch.meta_model().parameters())
        reserve = step_reserve_bytes(step_tokens, config.hidden_size, torch.bfloat16)
        row = [f"{arch.name}: {key}", f"{params / 1e9:.1f}B", f"{bpt:,}", f"{context * bpt / GIB:.2f}"]
        for mode in ("bf16", "int4"):
            weights = weight_bytes(arch, mode)
            tokens = kv_tokens_for_memory(total, weights, utilization, reserve, bpt) // block_size * block_size
            row += [f"{weights / GIB:.1f}", f"{tokens // context}" if weights < total * utilization else "no: weights"]
        rows.append(row)
    print(f"GLM architectures (transformers-native) on one {gpu_gb:g} GB GPU ({gpu_gb:g} x 10^9 bytes) at utilization {utilization}, "
          f"bf16 KV cache, step reserve for {step_tokens} tokens; weights in bf16 or --quantize int4:")
    print_table(["model", "params", "KV bytes/token", f"GiB per {context // 1024}k context", "bf16 weights GiB",
                 f"{context // 1024}k contexts (bf16)", "int4 weights GiB", f"{context // 1024}k contexts (int4)"], rows)
    print("KV bytes/token: GLM-4-32B-0414 2 x 61 layers x 2 KV heads x 128 x 2 bytes; GLM-4.5-Air 2 x 46 layers x 8 KV heads x 128 x 2 bytes; GLM-4.7-Flash and GLM-5 cache a "
          "latent (512) and a rope key (64) per layer, GLM-5 also an indexer key (128), each x 2 bytes. Latent layers "
          "expand their history per step (transformers' MLA), activations not in the reserve above.")


def main() -> int:
    defaults = Settings.model_fields
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="24,40,80", help="GPU memory sizes in GB (10^9 bytes), comma-separated")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--utilization", type=float, default=defaults["gpu_memory_utilization"].default)
    p.add_argument("--prefill-chunk-tokens", type=int, default=defaults["prefill_chunk_tokens"].default)
    p.add_argument("--max-running", type=int, default=defaults["max_running"].default)
    p.add_argument("--block-size", type=int, default=defaults["kv_block_size"].default)
    p.add_argument("--moe-gpu", type=float, default=80, help="GPU size in GB for the GLM MoE table (0: skip it)")
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
    if args.moe_gpu:
        print()
        moe_table(args.moe_gpu, args.utilization, step_tokens, 32768, args.block_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
