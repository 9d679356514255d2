"""Where a decode step's fixed cost goes, end to end through the engine (issue 24 item 3).

    python bench/profile_engine.py                  # random 2-layer model, one stream
    python bench/profile_engine.py --streams 4 --top 30

A random 2-layer model with SmolLM2's tokenizer computes almost nothing, so its ms/token is what
a step costs beside the weights: the scheduler, the KV bookkeeping, the model runner's inputs,
the forward's Python dispatch, the sampler, the detokenizer, the hand-off to the event loop and
the client's async iteration. The engine runs as the server runs it (its own thread, an asyncio
client); cProfile runs in both threads during the steady decode only, and the top entries by
own time print for each, with the unprofiled ms/token measured before.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the server does (glm_api/huge_pages.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_decode import CPU, STORY, decode_rate, tiny_model, variant


def _top(profile: cProfile.Profile, top: int, title: str) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print(f"\n== {title}: top {top} by own time ==")
    print("\n".join(line[:150] for line in lines[start - 3 : start + top + 1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before the engine starts")
    parser.add_argument("--no-pack", action="store_true", help="this branch's step without packed projections")
    parser.add_argument("--main", action="store_true", help="main's path: the general step, F.linear")
    parser.add_argument("--cache-dir", default=".cache/glm-api")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from glm_api.families.transformers_lm import packaged_chat_gguf

    template = _template(Path(args.cache_dir), packaged_chat_gguf)
    loaded = tiny_model(template)
    prompt = template.encode_messages(STORY)
    engine = variant(loaded, not args.main, pack=not args.no_pack, max_running=max(4, args.streams))
    profile = cProfile.Profile()
    profiling = {"on": False}
    inner = engine._step

    def step(plan, ops):  # the engine thread: profile whole steps while asked to
        if profiling["on"]:
            profile.enable()
            try:
                return inner(plan, ops)
            finally:
                profile.disable()
        return inner(plan, ops)

    engine._step = step
    engine.start()
    try:
        decode_rate(engine, [prompt] * args.streams, 16)  # warm up
        rates = [decode_rate(engine, [prompt] * args.streams, args.tokens) for _ in range(3)]
        ms = 1000 / max(rates) * args.streams
        client = cProfile.Profile()
        profiling["on"] = True
        client.enable()
        decode_rate(engine, [prompt] * args.streams, args.tokens)
        client.disable()
        profiling["on"] = False
    finally:
        engine.stop()
    steps = engine.stats.steps
    _top(profile, args.top, f"engine thread ({steps} steps in all)")
    _top(client, args.top // 2, "event loop (the client's side)")
    print(f"\n{args.streams} stream(s), random 2-layer model: {ms:.2f} ms/token (best of 3 unprofiled runs of "
          f"{args.tokens} tokens); torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    return 0


def _template(cache_dir: Path, packaged):
    from glm_api.families.detect import load_chat_model

    return load_chat_model(packaged(), CPU, torch.float32, cache_dir).template


if __name__ == "__main__":
    sys.exit(main())
