"""What chat log-probabilities cost: N streams with ``logprobs: true, top_logprobs: K`` against
the same N streams without, on one server, in one run.

    python bench/bench_logprobs.py                  # starts `python api.py` on a free port
    python bench/bench_logprobs.py --url http://host:8100 --streams 32 --top-logprobs 5

Each load sends ``--streams`` streaming greedy /v1/chat/completions requests at once (the
conversations of bench_chat.py, ``--max-tokens`` each) and reads every event as a client would
(the logprobs load parses its entries too); completion tokens come from the usage chunk. The
two loads alternate ``--repeats`` times (the CPU may be shared) and the best of each is kept;
the ratio is logprobs / plain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

from bench.bench_chat import prompts  # noqa: E402
from bench.common import glm_api_command, machine_line, percentile, print_table, running_server, sse_events  # noqa: E402


async def _one_stream(client: httpx.AsyncClient, url: str, messages: list[dict], args, top: int | None) -> tuple[float, int, int]:
    """(time to first content, completion tokens, logprob entries received) of one stream."""
    body = {"messages": messages, "stream": True, "temperature": 0, "max_tokens": args.max_tokens,
            "stream_options": {"include_usage": True}}
    if top is not None:
        body |= {"logprobs": True, "top_logprobs": top}
    started = time.perf_counter()
    first: float | None = None
    tokens = entries = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for event in sse_events(response):
            for choice in event.get("choices", []):
                if (choice.get("delta") or {}).get("content") and first is None:
                    first = time.perf_counter() - started
                for entry in (choice.get("logprobs") or {}).get("content") or ():
                    entries += 1
                    assert len(entry["top_logprobs"]) == top
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (first if first is not None else float("nan")), tokens, entries


async def load(url: str, args, top: int | None) -> tuple[float, list[float], int, int]:
    """(completion tokens/s, times to first token, tokens, logprob entries) of one load."""
    conversations = prompts(args.streams)
    limits = httpx.Limits(max_connections=args.streams + 4, max_keepalive_connections=args.streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*[_one_stream(client, url, c, args, top) for c in conversations])
        wall = time.perf_counter() - started
    tokens = sum(r[1] for r in results)
    return tokens / wall, [r[0] for r in results], tokens, sum(r[2] for r in results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start `python api.py` on a free port)")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--top-logprobs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs of each load; the best is kept")
    p.add_argument("--cache-dir", default=str(Path(".cache/glm-api").resolve()))
    args = p.parse_args()

    print(machine_line())
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            command = glm_api_command(["--cache-dir", args.cache_dir, "--device", "cpu", "--dtype", "float32"])
            url = stack.enter_context(running_server(command, ready_path="/ready", log_name="bench-logprobs")).url
        asyncio.run(load(url, argparse.Namespace(**{**vars(args), "streams": 2, "max_tokens": 4}), args.top_logprobs))
        best: dict[str, tuple] = {}
        for repeat in range(args.repeats):
            order = [("plain", None), ("logprobs", args.top_logprobs)]
            for name, top in order if repeat % 2 == 0 else order[::-1]:
                result = asyncio.run(load(url, args, top))
                print(f"  run {repeat + 1} {name}: {result[0]:.1f} tokens/s ({result[2]} tokens, {result[3]} logprob entries)")
                if name not in best or result[0] > best[name][0]:
                    best[name] = result
    rows = []
    for name in ("plain", "logprobs"):
        tps, ttft, tokens, entries = best[name]
        rows.append([name, args.streams, tps, percentile(ttft, 50), percentile(ttft, 90), tokens, entries])
    print_table(["load", "streams", "tokens/s", "ttft p50 s", "ttft p90 s", "tokens", "logprob entries"], rows)
    ratio = best["logprobs"][0] / best["plain"][0]
    print(f"logprobs (top_logprobs={args.top_logprobs}) / plain: {ratio:.2f}x")
    print(machine_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
