"""Write a random-weight checkpoint shaped like THUDM's chatglm3-6b-32k, for load and speed checks.

Same config.json fields and sizes (28 layers, hidden 4096, 2 KV groups of 128, MLP 13696,
vocabulary 65024, rope_ratio 50, 32k context), the same ``transformer.*`` keys, fp16, in 7
``pytorch_model-0000N-of-00007.bin`` shards with an index, as THUDM ships it: 6.24B parameters,
12.5 GB. The tokenizer is the tests' tiny sentencepiece model (the real one is not on PyPI); its
ids fit the padded vocabulary. Weights are generated shard by shard (never the whole model in
memory), scaled as the test fixture scales them. Takes ~2 minutes.

    python bench/make_chatglm3_6b.py --out /tmp/chatglm3-6b-32k-random
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tests.fixtures.chatglm3_tiny import _chatglm3_config, build_tiny_sentencepiece

SIZES = {
    "num_layers": 28,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "kv_channels": 128,
    "multi_query_group_num": 2,
    "ffn_hidden_size": 13696,
    "padded_vocab_size": 65024,
    "seq_length": 32768,
    "rope_ratio": 50,
}
SHARDS = 7


def _layer(config: dict, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    hidden, d = config["hidden_size"], config["kv_channels"]
    qkv = (config["num_attention_heads"] + 2 * config["multi_query_group_num"]) * d
    ffn = config["ffn_hidden_size"]

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(torch.float16)

    def norm() -> torch.Tensor:
        return (1 + torch.randn(hidden, generator=gen) * 0.1).to(torch.float16)

    p = f"transformer.encoder.layers.{n}."
    return {
        p + "input_layernorm.weight": norm(),
        p + "self_attention.query_key_value.weight": randn(qkv, hidden, scale=1 / math.sqrt(hidden)),
        p + "self_attention.query_key_value.bias": randn(qkv, scale=0.1),
        p + "self_attention.dense.weight": randn(hidden, config["num_attention_heads"] * d, scale=1 / math.sqrt(hidden)),
        p + "post_attention_layernorm.weight": norm(),
        p + "mlp.dense_h_to_4h.weight": randn(2 * ffn, hidden, scale=1 / math.sqrt(hidden)),
        p + "mlp.dense_4h_to_h.weight": randn(hidden, ffn, scale=1 / math.sqrt(ffn)),
    }


def write_checkpoint(out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_sentencepiece(out)
    config = _chatglm3_config(**SIZES)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}), encoding="utf-8")
    gen = torch.Generator().manual_seed(seed)
    hidden, vocab, layers = config["hidden_size"], config["padded_vocab_size"], config["num_layers"]
    per_shard = math.ceil(layers / SHARDS)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in range(SHARDS):
        name = f"pytorch_model-{shard + 1:05d}-of-{SHARDS:05d}.bin"
        tensors: dict[str, torch.Tensor] = {}
        if shard == 0:
            tensors["transformer.embedding.word_embeddings.weight"] = (
                torch.randn(vocab, hidden, generator=gen).to(torch.float16)
            )
        for n in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            tensors.update(_layer(config, n, gen))
        if shard == SHARDS - 1:
            tensors["transformer.encoder.final_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
            tensors["transformer.output_layer.weight"] = (
                torch.randn(vocab, hidden, generator=gen) * (3 / math.sqrt(hidden))
            ).to(torch.float16)
        torch.save(tensors, out / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"  {name}: {len(tensors)} tensors", flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    print(f"{out}: {total / 1e9:.2f} GB in {SHARDS} shards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/chatglm3-6b-32k-random"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    write_checkpoint(args.out, args.seed)
    print(f"written in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
