"""What a P-Tuning v2 prefix costs a decoding batch: rows behind a pinned prefix against the base.

    python bench/bench_ptuning.py [--streams 16] [--past 256] [--pre-seq-len 128] [--steps 8] [--rounds 2]

A random ChatGLM3-shaped checkpoint (real head width 128 and 2 kv groups, fewer and narrower
layers than 6B so it runs on a small CPU) in the chat engine with one P-Tuning v2 prefix pinned.
``--streams`` rows of ``--past`` tokens are prefilled, then decode steps are timed (the engine's
scheduler, KV cache manager and model runner; no sampling, so a random model's early stop token
cannot shorten a run): all rows on the base, all behind the prefix, half and half in one batch.
Ratios against the base run beside it. Each prefixed row's attention reads ``--pre-seq-len``
more keys a token; nothing else changes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import machine_line, print_table  # noqa: E402
from glm_api.engines.chat_engine import TransformersChatEngine  # noqa: E402
from glm_api.engines.sequence import Sequence  # noqa: E402
from glm_api.families.chatglm3 import load_chatglm3  # noqa: E402
from glm_api.ptuning import pin_prefixes  # noqa: E402
from glm_api.registry import ModelSource  # noqa: E402
from tests.fixtures.chatglm3_ptuning import build_ptuning  # noqa: E402
from tests.fixtures.chatglm3_tiny import build_tiny_chatglm3  # noqa: E402

SHAPE = dict(num_layers=4, hidden_size=1024, num_attention_heads=8, kv_channels=128, multi_query_group_num=2,
             ffn_hidden_size=2816, seq_length=4096)


class _Row:
    priority = 0

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq


@torch.inference_mode()
def decode_ms(engine: TransformersChatEngine, prompt: list[int], prefixes: list[str | None], steps: int) -> float:
    """Mean milliseconds of a decode step of these rows (after their prefill), through the
    engine's own scheduler, KV cache manager and model runner; each row is fed a fixed token."""
    running: list = []
    waiting = deque(
        _Row(Sequence(list(prompt), prefix=engine.prefixes[p] if p else None,
                      cache_salt=engine.prefixes[p].salt if p else None))
        for p in prefixes
    )
    timed: list[float] = []
    while len(timed) < steps:
        plan = engine.scheduler.schedule(running, waiting)
        decoding = not waiting and all(n == 1 for _, n in plan.scheduled)
        started = time.perf_counter()
        engine.kv.apply(engine.kv.take_block_ops())
        scheduled = [(r.seq, n) for r, n in plan.scheduled]
        engine.runner.execute(scheduled)
        engine.kv.computed(scheduled)
        if decoding:
            timed.append(time.perf_counter() - started)
        for seq, _ in scheduled:
            if seq.num_computed_tokens == len(seq.token_ids):
                seq.token_ids.append(5)
    for r in running:
        engine.kv.free(r.seq)
    return 1000 * sum(timed) / len(timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--past", type=int, default=256, help="tokens each row holds before the timed steps")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pre-seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_chatglm3(Path(tmp) / "base", **SHAPE)
        tuned = build_ptuning(Path(tmp) / "tuned", base, pre_seq_len=args.pre_seq_len, projection=True)
        engine = TransformersChatEngine(load_chatglm3(base, torch.device("cpu"), torch.float32), "base",
                                        max_running=args.streams, kv_cache_tokens=65536, prefix_cache_tokens=0)
        pin_prefixes(engine, ModelSource("base", base), (ModelSource("tuned", tuned),), torch.float32)
    prompt = engine.template.encode_messages([{"role": "user", "content": "今天北京的天气怎么样？" * 8}])
    prompt = (prompt * (args.past // len(prompt) + 1))[: args.past]
    runs = {"base": [None] * args.streams, "prefix": ["tuned"] * args.streams,
            "half and half": [None, "tuned"] * (args.streams // 2)}
    decode_ms(engine, prompt, [None, "tuned"], 2)  # warm-up
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, prefixes in runs.items():
            ms = decode_ms(engine, prompt, prefixes, args.steps)
            best[name] = min(best.get(name, float("inf")), ms)
    print(machine_line())
    print(f"{SHAPE}; {args.streams} rows decoding, {args.past} tokens each, prefix {args.pre_seq_len} positions; "
          f"mean of {args.steps} decode steps, best of {args.rounds}")
    print_table(["run", "ms per decode step", "vs base"],
                [[name, f"{ms:.1f}", f"{ms / best['base']:.2f}x"] for name, ms in best.items()])


if __name__ == "__main__":
    main()
