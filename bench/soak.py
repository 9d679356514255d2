"""Soak test: a few hundred mixed requests from concurrent clients against a running server.

    python bench/soak.py                      # starts its own server on a free port
    python bench/soak.py --url http://127.0.0.1:8100 --requests 400 --concurrency 24

Mixed load: streamed chats (a share of whose clients leave mid-stream), plain chats,
embeddings, tokenize calls and bad requests. Afterwards it checks that every good request got
a complete answer or a 429, every bad one a 4xx, that the engines' running and waiting counts
(from /metrics) are back to zero, and how far the server's memory moved after a warm-up round. Bounded in count and
time; traffic goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Tell me about the sea.", "What is 2 + 2?", "Name three colours.", "Write a haiku about rain.", "Hello!"]
BAD_BODIES = [
    ("/chat", b'{"messages": ['),
    ("/chat", b'{"messages": []}'),
    ("/embedding", b'{"prompt": 42}'),
    ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}'),
    ("/chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}'),
]


@dataclass
class SoakReport:
    outcomes: Counter = field(default_factory=Counter)  # kind -> count
    failures: list[str] = field(default_factory=list)  # anything that broke a promise
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    running_after: float | None = None
    waiting_after: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and self.running_after in (0, None) and self.waiting_after in (0, None)


async def _stream_chat(client: httpx.AsyncClient, url: str, rng: random.Random, report: SoakReport) -> None:
    leave_early = rng.random() < 0.3
    body = {"stream": True, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(4, 24), "temperature": 0.7}
    async with client.stream("POST", f"{url}/chat", json=body) as response:
        if response.status_code == 429:
            report.outcomes["stream: 429"] += 1
            return
        if response.status_code != 200:
            report.failures.append(f"stream chat answered {response.status_code}")
            return
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            events += 1
            data = line[5:].strip()
            if leave_early and events >= 3:
                report.outcomes["stream: left mid-stream"] += 1
                return
            if data == "[DONE]":
                report.outcomes["stream: complete"] += 1
                return
            if "error" in json.loads(data):
                report.failures.append(f"stream error event: {data}")
                return
        report.failures.append("stream ended without [DONE]")


async def _plain_chat(client: httpx.AsyncClient, url: str, rng: random.Random, report: SoakReport) -> None:
    body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": rng.randint(2, 16)}
    path = rng.choice(["/chat", "/v1/chat/completions"])
    response = await client.post(f"{url}{path}", json=body)
    if response.status_code == 429:
        report.outcomes["chat: 429"] += 1
    elif response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in {"stop", "length"}:
        report.outcomes["chat: complete"] += 1
    else:
        report.failures.append(f"chat {path} answered {response.status_code}: {response.text[:200]}")


async def _embedding(client: httpx.AsyncClient, url: str, rng: random.Random, report: SoakReport) -> None:
    texts = [rng.choice(PROMPTS) for _ in range(rng.randint(1, 8))]
    response = await client.post(f"{url}/embedding", json={"prompt": texts})
    if response.status_code == 429:
        report.outcomes["embedding: 429"] += 1
    elif response.status_code == 200 and len(response.json()["data"]) == len(texts):
        report.outcomes["embedding: complete"] += 1
    else:
        report.failures.append(f"embedding answered {response.status_code}: {response.text[:200]}")


async def _tokenize(client: httpx.AsyncClient, url: str, rng: random.Random, report: SoakReport) -> None:
    response = await client.post(f"{url}/tokenize", json={"prompt": rng.choice(PROMPTS)})
    if response.status_code == 200 and len(response.json()["tokenIds"]) == len(response.json()["tokens"]):
        report.outcomes["tokenize: complete"] += 1
    else:
        report.failures.append(f"tokenize answered {response.status_code}")


async def _bad(client: httpx.AsyncClient, url: str, rng: random.Random, report: SoakReport) -> None:
    path, body = rng.choice(BAD_BODIES)
    response = await client.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
    if 400 <= response.status_code < 500 and "error" in response.json():
        report.outcomes[f"bad request: {response.status_code}"] += 1
    else:
        report.failures.append(f"bad request to {path} answered {response.status_code}")


RUNNING_GAUGES = {"glm_api_chat_running_sequences"}
WAITING_GAUGES = {"glm_api_chat_waiting_requests", "glm_api_embedding_waiting_texts"}

KINDS = [(_stream_chat, 4), (_plain_chat, 2), (_embedding, 3), (_tokenize, 1), (_bad, 2)]


def engine_counts(url: str) -> tuple[float | None, float | None]:
    """Running and waiting sequences summed over engines, from /metrics (None if absent)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None, None
    running = waiting = None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{")[0].split(" ")[0]
        value = float(line.rsplit(" ", 1)[1])
        if name in RUNNING_GAUGES:
            running = (running or 0) + value
        elif name in WAITING_GAUGES:
            waiting = (waiting or 0) + value
    return running, waiting


async def soak(url: str, requests: int, concurrency: int, seed: int, time_limit: float) -> SoakReport:
    report = SoakReport()
    rng = random.Random(seed)
    plan = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS], k=requests)
    queue: asyncio.Queue = asyncio.Queue()
    for kind in plan:
        queue.put_nowait(kind)
    deadline = time.monotonic() + time_limit

    async def worker(worker_seed: int) -> None:
        local = random.Random(worker_seed)
        async with httpx.AsyncClient(timeout=120) as client:
            while not queue.empty() and time.monotonic() < deadline:
                kind = queue.get_nowait()
                try:
                    await kind(client, url, local, report)
                except httpx.HTTPError as exc:
                    report.failures.append(f"{kind.__name__}: {type(exc).__name__}: {exc}")

    started = time.monotonic()
    await asyncio.gather(*(worker(seed * 1000 + i) for i in range(concurrency)))
    report.seconds = time.monotonic() - started
    if not queue.empty():
        report.failures.append(f"time limit reached with {queue.qsize()} requests not sent")
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "api.py", "--host", "127.0.0.1", "--port", str(port), *extra],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not become ready")


def run(url: str, pid: int, requests: int, concurrency: int, seed: int, time_limit: float) -> SoakReport:
    server = psutil.Process(pid)
    # Warm up first: the first batches grow torch's and the allocator's pools once; what
    # matters is whether memory keeps growing with load after that.
    warm = asyncio.run(soak(url, max(20, concurrency * 2), concurrency, seed + 7919, time_limit))
    if warm.failures:
        raise RuntimeError(f"warm-up failed: {warm.failures[:3]}")
    time.sleep(1.0)
    rss_before = server.memory_info().rss / 2**20
    report = asyncio.run(soak(url, requests, concurrency, seed, time_limit))
    time.sleep(1.0)  # let aborted requests leave the engines
    report.running_after, report.waiting_after = engine_counts(url)
    report.rss_before_mb, report.rss_after_mb = rss_before, server.memory_info().rss / 2**20
    return report


def print_report(report: SoakReport, requests: int, concurrency: int) -> None:
    print(f"soak: {requests} requests from {concurrency} concurrent clients in {report.seconds:.1f} s")
    print("| outcome | count |\n| --- | --- |")
    for outcome, count in sorted(report.outcomes.items()):
        print(f"| {outcome} | {count} |")
    print(f"running after: {report.running_after}, waiting after: {report.waiting_after}")
    print(f"server RSS: {report.rss_before_mb:.0f} MB before, {report.rss_after_mb:.0f} MB after "
          f"({report.rss_after_mb - report.rss_before_mb:+.0f} MB)")
    print(f"failures: {len(report.failures)}")
    for failure in report.failures[:20]:
        print(f"  - {failure}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="its process id, for memory (with --url)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=900)
    parser.add_argument("server_args", nargs="*", help="extra arguments for the started server (after --)")
    args = parser.parse_args()
    process = None
    if args.url:
        url, pid = args.url, args.pid
        if pid is None:
            raise SystemExit("--pid is needed with --url to measure memory")
    else:
        process, url = start_server(args.server_args)
        pid = process.pid
    try:
        report = run(url, pid, args.requests, args.concurrency, args.seed, args.time_limit)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    print_report(report, args.requests, args.concurrency)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
