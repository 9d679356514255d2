"""What LoRA adapters cost: 32 streams spread over 4 adapters against 32 streams on the base
model, on one server, in one run (issue 29; goal: at least 0.8x).

    python bench/bench_lora.py                      # makes the adapters, starts `python api.py --lora ...`
    python bench/bench_lora.py --rank 16 --targets q_proj,v_proj
    python bench/bench_lora.py --kernels            # also: grouped rows vs per-token gather (BGMV)

First, in this process, one decode step of the model runner with all rows on the base against
rows spread over the adapters (``--step-repeats``, the fastest of each): the engine's own cost,
without the HTTP side's noise.

The adapters are made here with peft on the packaged default chat model (SmolLM2-135M-Instruct,
from the GGUF cache): ``--adapters`` LoraConfigs of ``--rank`` on ``--targets`` (default every
attention and MLP projection), with random non-zero A and B (small, so the answers stay of the
usual length), saved to a temporary folder and given to the server with ``--lora``. Each load
sends ``--streams`` streaming greedy /v1/chat/completions requests at once (bench_chat.py's
conversations, ``--max-tokens`` each): the base load names the base model, the LoRA load names
the adapters in turn (stream i uses adapter i mod n), so every step mixes all of them. The two
loads alternate ``--repeats`` times; the ratio is LoRA / base of the best of each, and of each
back-to-back pair (on a shared CPU a neighbour's burst moves one run by 10-30%). The prefix
cache is off so that repeats do not favour either load.

``--kernels`` times, in this process, the two ways of applying deltas of mixed rows on
SmolLM2's projection shapes: the tokens grouped by adapter (what glm_api/engines/lora.py does)
and a per-token gather of the stacked matrices followed by batched matmuls (punica's BGMV),
for one decode step of ``--streams`` rows over ``--adapters`` adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.bench_chat import prompts  # noqa: E402
from bench.common import glm_api_command, machine_line, percentile, print_table, running_server, sse_events  # noqa: E402

BASE = "SmolLM2-135M-Instruct"
ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def make_adapters(args, out: Path, loaded=None) -> list[tuple[str, Path]]:
    """``--adapters`` peft adapters of the packaged model, saved under ``out``."""
    from peft import LoraConfig, get_peft_model

    loaded = loaded or packaged_model(args)
    made = []
    for i in range(args.adapters):
        torch.manual_seed(i)
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","), lora_dropout=0.0)
        peft_model = get_peft_model(loaded.model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.copy_(torch.randn(param.shape) * (0.02 if "lora_B" in name else 0.05))
        folder = out / f"adapter{i}"
        peft_model.save_pretrained(str(folder))
        loaded.model = peft_model.unload()  # the base back, untouched, for the next adapter
        made.append((f"adapter{i}", folder))
    return made


def packaged_model(args):
    from glm_api.families.detect import load_chat_model
    from glm_api.families.transformers_lm import packaged_chat_gguf

    return load_chat_model(packaged_chat_gguf(), torch.device("cpu"), torch.float32, Path(args.cache_dir))


@torch.inference_mode()
def decode_steps(args, loaded, adapters: list[tuple[str, Path]]) -> None:
    """The engine's own step, in this process: one decode step of ``--streams`` rows (each after
    a 64-token prompt) through the model runner, all rows on the base against rows spread over
    the adapters; interleaved, the fastest of each kept."""
    from glm_api.adapters.lora_files import read_lora
    from glm_api.engines.kv_blocks import PrefixHit
    from glm_api.engines.kv_cache_manager import KVCacheManager
    from glm_api.engines.lora import LoraLayers
    from glm_api.engines.model_runner import ModelRunner
    from glm_api.engines.sequence import Sequence

    runner = ModelRunner.for_model(
        loaded.model, BASE, context_length=2048, block_size=16, kv_cache_tokens=16384,
        gpu_memory_utilization=0.9, step_tokens=512,
    )
    runner.lora = LoraLayers(loaded.model)
    for name, folder in adapters:
        runner.lora.add(read_lora(name, folder, loaded.model))
    kv = KVCacheManager(runner.pool)
    names = [name for name, _ in adapters]
    seqs = {}
    for label, adapter_of in (("base", lambda i: None), ("lora", lambda i: names[i % len(names)])):
        rows = [Sequence([(7 * i + j) % 1000 + 10 for j in range(64)], adapter=adapter_of(i)) for i in range(args.streams)]
        for seq in rows:
            kv.admit(seq, PrefixHit(), kv.blocks_for(80))
        kv.apply(kv.take_block_ops())
        for seq in rows:  # the prompts, then a first decode token
            runner.execute([(seq, 64)])
            seq.num_computed_tokens = 64
            seq.token_ids.append(5)
        seqs[label] = rows
    best: dict[str, float] = {}
    for _ in range(args.step_repeats):
        for label, rows in seqs.items():
            started = time.perf_counter()
            runner.execute([(seq, 1) for seq in rows])  # the same position each time: same work
            ms = (time.perf_counter() - started) * 1000
            best[label] = min(ms, best.get(label, ms))
    print(
        f"one decode step of {args.streams} rows in process (model runner, best of {args.step_repeats}): "
        f"base {best['base']:.1f} ms, over {len(names)} adapters {best['lora']:.1f} ms: {best['base'] / best['lora']:.2f}x"
    )


async def _one_stream(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], args) -> tuple[float, int]:
    body = {"model": model, "messages": messages, "stream": True, "temperature": 0, "max_tokens": args.max_tokens,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for event in sse_events(response):
            for choice in event.get("choices", []):
                if (choice.get("delta") or {}).get("content") and first is None:
                    first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (first if first is not None else float("nan")), tokens


async def load(url: str, models: list[str], args) -> tuple[float, list[float], int]:
    """(completion tokens/s, times to first token, tokens): stream i asks for models[i % len]."""
    conversations = prompts(args.streams)
    limits = httpx.Limits(max_connections=args.streams + 4, max_keepalive_connections=args.streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *[_one_stream(client, url, models[i % len(models)], c, args) for i, c in enumerate(conversations)]
        )
        wall = time.perf_counter() - started
    tokens = sum(r[1] for r in results)
    return tokens / wall, [r[0] for r in results], tokens


def kernels(args) -> None:
    """Grouped rows against a per-token gather, on SmolLM2's projection shapes."""
    rows, n, r = args.streams, args.adapters, args.rank
    shapes = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (576, 192), "gate_proj/up_proj": (576, 1536), "down_proj": (1536, 576)}
    per_layer = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1}
    idx = torch.arange(rows) % n  # stream i uses adapter i mod n, as the loads below
    table = []
    totals = {"base": 0.0, "grouped": 0.0, "gather": 0.0, "masked": 0.0}
    for name, (fin, fout) in shapes.items():
        x = torch.randn(rows, fin)
        w = torch.randn(fin, fout)
        a = torch.randn(n, fin, r)
        b = torch.randn(n, r, fout)
        groups = [(slot, (idx == slot).nonzero().flatten()) for slot in range(n)]

        def base():
            return x @ w

        def grouped():
            y = x @ w
            for slot, sel in groups:
                y.index_add_(0, sel, (x[sel] @ a[slot]) @ b[slot], alpha=2.0)
            return y

        def gather():
            y = x @ w
            shrink = torch.bmm(x[:, None, :], a[idx])  # [rows, 1, r]
            return y.add_(torch.bmm(shrink, b[idx])[:, 0], alpha=2.0)

        a_cat = a.permute(1, 0, 2).reshape(fin, n * r)  # every adapter side by side
        b_cat = b.reshape(n * r, fout)
        mask = (idx[:, None] == torch.arange(n).repeat_interleave(r)[None, :]).float()  # a token's own columns

        def masked():
            y = x @ w
            h = (x @ a_cat).mul_(mask)
            return y.addmm_(h, b_cat)

        times = {}
        candidates = (("base", base), ("grouped", grouped), ("gather", gather), ("masked", masked))
        for _ in range(7):  # interleaved rounds, the fastest of each kept: the CPU is shared
            for label, fn in candidates:
                fn()
                started = time.perf_counter()
                for _ in range(20):
                    fn()
                ms = (time.perf_counter() - started) / 20 * 1000
                times[label] = min(ms, times.get(label, ms))
        for label in times:
            totals[label] += times[label] * per_layer[name] * 30  # SmolLM2: 30 layers
        table.append([name, f"{fin}->{fout}", times["base"], times["grouped"], times["gather"], times["masked"]])
    print_table(["projection", "shape", "base ms", "+ grouped ms", "+ gather ms", "+ masked ms"], table)
    print(
        f"one decode step's projections ({rows} rows, {n} adapters, rank {r}, 30 layers): base {totals['base']:.1f} ms, "
        f"grouped {totals['grouped']:.1f} ms, gather {totals['gather']:.1f} ms, masked {totals['masked']:.1f} ms"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default=ALL_TARGETS)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs of each load; the best is kept")
    p.add_argument("--kernels", action="store_true", help="also time grouped rows against a per-token gather")
    p.add_argument("--step-repeats", type=int, default=20, help="in-process decode steps timed per load (0: none)")
    p.add_argument("--cache-dir", default=str(Path(".cache/glm-api").resolve()))
    args = p.parse_args()

    print(machine_line())
    if args.kernels:
        with torch.inference_mode():
            kernels(args)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp, contextlib.ExitStack() as stack:
        loaded = packaged_model(args)
        adapters = make_adapters(args, Path(tmp), loaded)
        if args.step_repeats:
            decode_steps(args, loaded, adapters)
        del loaded
        flags = ["--cache-dir", args.cache_dir, "--device", "cpu", "--dtype", "float32", "--prefix-cache-tokens", "0"]
        for name, folder in adapters:
            flags += ["--lora", f"{name}={folder}"]
        url = stack.enter_context(running_server(glm_api_command(flags), ready_path="/ready", log_name="bench-lora")).url
        names = [name for name, _ in adapters]
        asyncio.run(load(url, [BASE, *names], argparse.Namespace(**{**vars(args), "streams": 5, "max_tokens": 4})))
        best: dict[str, tuple] = {}
        pairs = []
        for repeat in range(args.repeats):
            order = [("base", [BASE]), ("lora", names)]
            this: dict[str, float] = {}
            for label, models in order if repeat % 2 == 0 else order[::-1]:
                result = asyncio.run(load(url, models, args))
                print(f"  run {repeat + 1} {label}: {result[0]:.1f} tokens/s ({result[2]} tokens)")
                this[label] = result[0]
                if label not in best or result[0] > best[label][0]:
                    best[label] = result
            pairs.append(this["lora"] / this["base"])
    rows = []
    for label in ("base", "lora"):
        tps, ttft, tokens = best[label]
        rows.append([label, args.streams, tps, percentile(ttft, 50), percentile(ttft, 90), tokens])
    print_table(["load", "streams", "tokens/s", "ttft p50 s", "ttft p90 s", "tokens"], rows)
    ratio = best["lora"][0] / best["base"][0]
    print(
        f"{args.streams} streams over {args.adapters} adapters (rank {args.rank}, {args.targets}) / "
        f"{args.streams} streams on the base: {ratio:.2f}x (best of each); back-to-back pairs: "
        + ", ".join(f"{r:.2f}" for r in pairs) + f" (median {sorted(pairs)[len(pairs) // 2]:.2f})"
    )
    print(machine_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
