"""One stream through the server (HTTP, SSE) against the memory-bandwidth limit (issue 24).

    python bench/bench_http_stream.py                      # starts `python api.py` on a free port
    python bench/bench_http_stream.py --url http://host:8100 --runs 5 --tokens 300

What a client sees, where ``bench/bench_decode.py`` measures the engine without HTTP: a greedy
chat completion streamed with ``stream_options.include_usage``, decode tokens/s from the first
content chunk to the last, against this machine's limit for the default model measured in the
same run (``bench_decode``'s 256 MiB ``torch.mv`` bandwidth and the packaged SmolLM2's weight
bytes, loaded here only to count them). The server's own event-loop thread shares the CPUs with
the engine, so the gap to the engine-only figure is what serving costs a token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import torch

from bench.bench_decode import CPU, STORY, bandwidth_gbs, in_passing_thread, weight_bytes
from bench.common import glm_api_command, machine_line, print_table, running_server, sse_events


def stream_rate(url: str, model: str, tokens: int) -> tuple[int, float]:
    """(completion tokens, decode tokens/s after the first content chunk) of one streamed answer."""
    return asyncio.run(_stream_rate(url, model, tokens))


async def _stream_rate(url: str, model: str, tokens: int) -> tuple[int, float]:
    body = {
        "model": model, "messages": STORY, "max_tokens": tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    first = last = 0.0
    completion = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for event in sse_events(response):
                if event.get("usage"):
                    completion = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
    if completion < 3 or last <= first:
        raise RuntimeError(f"the answer was too short to time ({completion} tokens)")
    return completion, (completion - 1) / (last - first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `python api.py` here)")
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens of each answer (default 200)")
    parser.add_argument("--runs", type=int, default=3, help="answers timed, one after another (default 3)")
    parser.add_argument("--cache-dir", default=".cache/glm-api", help="where the converted SmolLM2 is cached")
    args = parser.parse_args()

    from glm_api.families.detect import load_chat_model
    from glm_api.families.transformers_lm import packaged_chat_gguf

    print(machine_line())
    loaded = in_passing_thread(load_chat_model, packaged_chat_gguf(), CPU, torch.float32, Path(args.cache_dir))
    size = weight_bytes(loaded.model)
    del loaded
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(
            running_server(glm_api_command(), ready_path="/ready", log_name="bench-http-stream")
        ).url
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        stream_rate(url, model, 16)  # warm up
        rows = []
        for run in range(args.runs):
            gbs = in_passing_thread(bandwidth_gbs)  # just before each answer: the host's state now
            limit = gbs * 1e9 / size
            completion, rate = stream_rate(url, model, args.tokens)
            rows.append((run + 1, f"{gbs:.1f} GB/s", f"{limit:.1f} tok/s", completion, f"{rate:.1f} tok/s",
                         f"{rate / limit:.2f}"))
    print_table(("run", "bandwidth (mv)", f"limit ({size / 1e6:.0f} MB a token)", "tokens", "one stream", "share"),
                rows)
    print(f"model {model}; goal >= 0.85; load average {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
