"""Load time and peak memory of the ChatGLM3 loader, against a naive load beside it.

Builds a random ChatGLM3-layout checkpoint (fp16, two shards, real 65024-row vocabulary) in a
temp dir, then loads it in fresh subprocesses so each peak RSS is its own:
  streamed  load_chatglm3 (meta model, shards memory-mapped/streamed, tensor by tensor)
  naive     torch.load every shard whole, convert, build the model normally, load_state_dict
Peak is the rise of the process's peak RSS over its RSS just before loading.

    python bench/bench_chatglm3_load.py [--layers 4 --hidden 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import process_status_bytes

MB = 1024 * 1024


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _naive_load(folder: Path, dtype):
    """What loading without streaming looks like: whole shards, a converted copy, a model."""
    import torch
    from transformers import GlmForCausalLM

    from glm_api.families.chatglm3.checkpoint import convert_key, glm_config, read_chatglm3_config, weight_files
    from glm_api.families.chatglm3.template import ChatGLM3Template
    from glm_api.families.chatglm3.tokenizer import ChatGLM3Tokenizer

    cfg = read_chatglm3_config(folder)
    config = glm_config(cfg, ChatGLM3Template(ChatGLM3Tokenizer(folder / "tokenizer.model")), dtype)
    raw = {}
    for file in weight_files(folder)[0]:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw.update(load_file(str(file)))
        else:
            raw.update(torch.load(file, map_location="cpu", weights_only=True))
    state = {name: t.to(dtype) for key, tensor in raw.items() for name, t in (convert_key(key, tensor, cfg) or [])}
    model = GlmForCausalLM(config).to(dtype)
    model.load_state_dict(state, strict=False)
    return model


def child(folder: Path, dtype_name: str, mode: str) -> None:
    # Every import happens before the measurement: only loading is timed and counted.
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.models.glm.modeling_glm  # noqa: F401
    from transformers import GlmForCausalLM  # noqa: F401

    from glm_api.families.chatglm3 import load_chatglm3

    dtype = getattr(torch, dtype_name)
    before = process_status_bytes("VmRSS")
    start = time.perf_counter()
    if mode == "streamed":
        model = load_chatglm3(folder, torch.device("cpu"), dtype).model
    else:
        model = _naive_load(folder, dtype)
    seconds = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak": _peak_rss() - before, "model_bytes": model_bytes}))


def run_child(folder: Path, dtype: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), dtype, mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=65024, help="padded_vocab_size (ChatGLM3: 65024)")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.child[2])
        return

    from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3

    heads, kv_channels = args.hidden // 32, 32
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for fmt in ("bin", "safetensors"):
            folders[fmt] = build_tiny_chatglm3(
                Path(tmp) / fmt, weights_format=fmt, num_layers=args.layers, hidden_size=args.hidden,
                num_attention_heads=heads, kv_channels=kv_channels, multi_query_group_num=2,
                ffn_hidden_size=args.hidden * 27 // 8, padded_vocab_size=args.vocab,
            )
        size = sum(f.stat().st_size for f in folders["bin"].glob("pytorch_model-*.bin"))
        print(f"checkpoint: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
              f"fp16, {size / MB:.1f} MB in 2 shards\n")
        print(f"{'format':<12}{'dtype':<10}{'mode':<10}{'load s':>8}{'peak MB':>10}"
              f"{'model MB':>10}{'peak/ckpt':>11}{'peak/model':>11}")
        for fmt, folder in folders.items():
            for dtype in ("float16", "float32"):
                for mode in ("naive", "streamed"):
                    r = run_child(folder, dtype, mode)
                    print(f"{fmt:<12}{dtype:<10}{mode:<10}{r['seconds']:>8.2f}{r['peak'] / MB:>10.1f}"
                          f"{r['model_bytes'] / MB:>10.1f}{r['peak'] / size:>11.2f}{r['peak'] / r['model_bytes']:>11.2f}")


if __name__ == "__main__":
    main()
