"""Where one decode step's time goes: torch.profiler over steady decode steps of the engine's
own scheduler, KV cache manager, model runner and sampler (no threads, no HTTP).

    python bench/profile_decode.py                 # default model (SmolLM2-135M fp32), 1 row
    python bench/profile_decode.py --rows 32 --tiny
    python bench/profile_decode.py --compile on

Prints the profiler's top entries by self CPU time, and the step's wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the server does (glm_api/huge_pages.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging

import torch

from bench.bench_decode import CPU, STORY, tiny_model, variant


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tiny", action="store_true", help="the random 2-layer model instead of SmolLM2")
    parser.add_argument("--compile", choices=["on", "off", "default"], default="default")
    parser.add_argument("--no-pack", action="store_true", help="this branch's step without packed projections")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before the engine starts")
    parser.add_argument("--main", action="store_true", help="main's path: the general step, F.linear")
    parser.add_argument("--cache-dir", default=".cache/glm-api")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("glm_api.families.dense_kernels").setLevel(logging.INFO)

    from glm_api.engines.base import SamplingParams
    from glm_api.engines.request_state import EngineRequest
    from glm_api.engines.sampler import needs_per_row_sampling
    from glm_api.engines.sequence import Sequence
    from glm_api.families.detect import load_chat_model
    from glm_api.families.transformers_lm import packaged_chat_gguf

    loaded = load_chat_model(packaged_chat_gguf(), CPU, torch.float32, Path(args.cache_dir))
    if args.tiny:
        loaded = tiny_model(loaded.template)
    options = {} if args.compile == "default" else {"compile_decode": args.compile == "on"}
    engine = variant(loaded, not args.main, pack=not args.no_pack, max_running=max(args.rows, 1), **options)
    engine._warm_up() if hasattr(engine, "_warm_up") else None
    prompt = loaded.template.encode_messages(STORY)
    params = SamplingParams(max_tokens=10_000, temperature=0.0)
    for i in range(args.rows):
        engine._waiting.append(
            EngineRequest(
                request_id=f"p{i}", prompt_ids=list(prompt), params=params, loop=None, queue=None,
                detok=None, seq=Sequence(token_ids=list(prompt)), stop_ids=frozenset(),
                per_row=needs_per_row_sampling(params), matcher=None,
            )
        )

    def step() -> None:
        plan = engine.scheduler.schedule(engine._running, engine._waiting)
        engine.kv.apply(engine.kv.take_block_ops())
        scheduled = [(req.seq, n) for req, n in plan.scheduled]
        out = engine.runner.execute(scheduled)
        engine.kv.computed(scheduled)
        rows = [plan.scheduled[i][0] for i in out.sampling]
        for req, token in zip(rows, engine.sampler.sample(rows, out.logits).tokens):
            req.output_ids.append(token)
            req.seq.token_ids.append(token)

    with torch.inference_mode():
        while engine._waiting or any(r.seq.num_uncomputed_tokens > 1 for r in engine._running):
            step()  # prefill
        for _ in range(5):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - start) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    print(f"decode step, {args.rows} row(s): {wall * 1000:.2f} ms wall (unprofiled, mean of {args.steps}); "
          f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
