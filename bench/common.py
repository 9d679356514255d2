"""Helpers shared by the benchmark scripts: a server subprocess, timing, the printed table.

The scripts measure a running server and, in the same run, the in-process limit of the same
model on the same machine, and print the ratio: absolute numbers on a shared CPU move with
the neighbours' load, a ratio measured minutes apart much less.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None  # None: a server someone else runs (--url)
    log_path: Path | None = None


def wait_ready(url: str, path: str, process: subprocess.Popen | None, timeout: float, log_path: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log = log_path.read_text(errors="replace")[-4000:] if log_path else ""
            raise RuntimeError(f"server exited with {process.returncode}:\n{log}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}{path} not ready after {timeout:.0f} s (log: {log_path})")


@contextmanager
def running_server(
    command: Sequence[str], *, ready_path: str, log_name: str, env: dict[str, str] | None = None, timeout: float = 300
):
    """Start ``command`` (with ``{port}`` filled in) and stop it on exit; yields a :class:`Server`."""
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{log_name}-{port}.log"
    args = [part.format(port=port) for part in command]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server.url, ready_path, process, timeout, log_path)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class RawHTTPConnection:
    """A minimal HTTP/1.1 keep-alive client for JSON requests over one connection.

    The load generator runs on the same CPUs as the server; httpx spends ~2 ms of CPU per
    request, which on 2 cores would be measured as server slowness. This spends a few tens of
    microseconds: enough HTTP for our own server's answers (Content-Length or chunked bodies).
    """

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self._reader = self._writer = None

    async def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        import asyncio

        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        status_line = await self._reader.readline()
        status = int(status_line.split()[1])
        length, chunked = None, False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, await self._reader.readexactly(length or 0)
        parts = []
        while size := int((await self._reader.readline()).strip(), 16):
            parts.append(await self._reader.readexactly(size))
            await self._reader.readline()
        await self._reader.readline()
        return status, b"".join(parts)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def glm_api_command(extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "api.py", "--host", "127.0.0.1", "--port", "{port}", *extra]


async def sse_events(response) -> AsyncIterator[dict]:
    """The JSON events of a streamed chat response as they arrive, up to ``[DONE]``; an in-band
    error event raises."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        yield event


def process_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM: the peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A GitHub-flavoured markdown table, so it can be pasted into the docs as is."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def machine_line() -> str:
    import platform

    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}"
    )
