"""The Batch API's two promises, measured side by side on one server in one run.

    python bench/bench_batch.py [--lines 32] [--max-tokens 16] [--rounds 3]

1. Interactive users first: time to first token (p50) of rounds of ``--concurrency`` streamed
   chat requests, with no batch (before and after) and while a large batch runs. Ratio: with
   batch / without.
2. Batch throughput: ``--lines`` chat lines run as a batch (create to completed), against the
   same lines sent at once as concurrent HTTP requests. Ratio: batch lines/s / HTTP lines/s.

Absolute figures move with the machine's load; the ratios are measured minutes apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from bench.common import glm_api_command, machine_line, percentile, print_table, running_server, sse_events  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["the sea", "a red fox", "winter", "trains", "bread", "the moon", "rivers", "music"]


def body(i: int, max_tokens: int) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} ({i})."}]}


async def ttft_round(client: httpx.AsyncClient, concurrency: int, max_tokens: int) -> list[float]:
    async def one(i: int) -> float:
        started = time.monotonic()
        async with client.stream("POST", "/v1/chat/completions", json={**body(1000 + i, max_tokens), "stream": True}) as r:
            async for event in sse_events(r):
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    return time.monotonic() - started
        return time.monotonic() - started

    return list(await asyncio.gather(*(one(i) for i in range(concurrency))))


async def ttfts(client, rounds: int, concurrency: int) -> list[float]:
    out: list[float] = []
    for _ in range(rounds):
        out += await ttft_round(client, concurrency, 4)
    return out


async def start_batch(client: httpx.AsyncClient, lines: int, max_tokens: int) -> str:
    text = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": body(i, max_tokens)}) + "\n" for i in range(lines))
    file = (await client.post("/v1/files", files={"file": ("b.jsonl", text.encode())}, data={"purpose": "batch"})).json()
    batch = await client.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h"})
    return batch.json()["id"]


async def wait_batch(client, batch_id: str, until) -> dict:
    while True:
        batch = (await client.get(f"/v1/batches/{batch_id}")).json()
        if until(batch):
            return batch
        await asyncio.sleep(0.1)


async def main_async(args, url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await ttft_round(client, 2, 2)  # warm-up
        idle: list[float] = []
        busy: list[float] = []
        if not args.only_throughput:
            # 1. TTFT with no batch, during a large batch, with no batch again.
            idle = await ttfts(client, args.rounds, args.concurrency)
            big = await start_batch(client, args.lines * 4, args.max_tokens * 4)
            await wait_batch(client, big, lambda b: b["request_counts"]["completed"] >= 1)
            busy = await ttfts(client, args.rounds, args.concurrency)
            await client.post(f"/v1/batches/{big}/cancel")
            await wait_batch(client, big, lambda b: b["status"] == "cancelled")
            idle += await ttfts(client, args.rounds, args.concurrency)

        # 2. The same lines as a batch and as concurrent HTTP requests, twice, interleaved.
        http_s = batch_s = float("inf")
        for _ in range(args.repeats):
            started = time.monotonic()
            await asyncio.gather(*(client.post("/v1/chat/completions", json=body(i, args.max_tokens))
                                   for i in range(args.lines)))
            http_s = min(http_s, time.monotonic() - started)
            started = time.monotonic()
            batch_id = await start_batch(client, args.lines, args.max_tokens)
            done = await wait_batch(client, batch_id, lambda b: b["status"] == "completed")
            batch_s = min(batch_s, time.monotonic() - started)
            assert done["request_counts"]["completed"] == args.lines, done

    print(f"machine: {machine_line()} (shared with other work: ratios, not absolute figures)")
    p_idle, p_busy = percentile(idle, 50), percentile(busy, 50)  # NaN ("-") with --only-throughput
    print_table(["measure", "baseline", "with batch / as batch", "ratio"], [
        ["interactive TTFT p50 (s)", p_idle, p_busy, p_busy / p_idle],
        [f"{args.lines} lines x {args.max_tokens} tokens: lines/s (HTTP vs batch)",
         args.lines / http_s, args.lines / batch_s, http_s / batch_s],
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="throughput runs, interleaved; the best of each counts")
    p.add_argument("--only-throughput", action="store_true", help="skip the TTFT part")
    p.add_argument("--server-arg", action="append", default=[], help="extra server flags, repeatable")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as data:
        command = glm_api_command(["--data-dir", data, "--log-level", "warning", *args.server_arg])
        with running_server(command, ready_path="/ready", log_name="bench-batch") as server:
            asyncio.run(main_async(args, server.url))


if __name__ == "__main__":
    main()
