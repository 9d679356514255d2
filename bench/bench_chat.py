"""Chat throughput under concurrency: a running glm-api server against the in-process limit.

    python bench/bench_chat.py                      # starts `python api.py` on a free port
    python bench/bench_chat.py --url http://host:8100
    python bench/bench_chat.py --transformers-serve # also `transformers serve --continuous-batching`
    python bench/bench_chat.py --generate-batch     # also transformers' in-process generate_batch
    python bench/bench_chat.py --device cpu,cpu     # the server with one chat replica per device

For each concurrency N (default 1, 8, 32) it sends N streaming greedy requests of
``--max-tokens`` tokens at once and measures aggregate completion tokens/s and time to first
token; in the same run, the same model in this process runs ``model.generate`` on a static
batch of the same N prompts (same dtype, exactly ``--max-tokens`` new tokens): the limit a
server batching perfectly would reach. The ratio is server / limit. Each figure is the best
of ``--repeats`` runs, interleaved, since the CPU may be shared.

``--transformers-serve`` runs the same load against ``transformers serve
--continuous-batching`` on the same weights, once per ``--serve-dtypes`` entry. bfloat16 comes
first: it is what that server runs with its default ``--dtype auto`` on SmolLM2 as published
(bfloat16 weights; DESIGN.md's 260 MB folder), the set-up behind the anchor the speed goal was
set against. float32 is the precision glm-api chooses on a CPU, for the comparison at equal
precision.

``--device`` is passed to the server: a list (``cuda:0,cuda:1``, ``all``, ``cpu,cpu``) runs one
chat replica per device behind the router, with ``--max-running`` per replica. The in-process
limit stays one model on the first listed device, so with N replicas on N GPUs the ratio can
reach N; on this 2-core CPU two replicas share the same cores (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

from bench.common import glm_api_command, machine_line, percentile, print_table, running_server, sse_events  # noqa: E402

TOPICS = [
    "a lighthouse keeper", "a robot learning to paint", "the first winter in a mountain village", "a lost cat in Paris",
    "two rival bakers", "a ship caught in a storm", "a library that never closes", "a dragon who is afraid of fire",
]


def prompts(n: int) -> list[list[dict]]:
    """n different conversations of different lengths, each asking for a long answer."""
    out = []
    for i in range(n):
        detail = " Describe the place, the people and what happens, in detail." * (i % 3)
        out.append([{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}.{detail}"}])
    return out


@dataclass
class LoadResult:
    tokens_per_s: float
    ttft: list[float]
    tokens: int
    stopped_early: int


async def _one_stream(client: httpx.AsyncClient, url: str, api: str, model: str | None, messages: list[dict],
                      max_tokens: int, count_tokens) -> tuple[float, int, bool]:
    if api == "seed":
        path, body = "/chat", {"messages": messages, "stream": True, "chunk": True, "temperature": 0,
                               "repetition_penalty": 1.0, "max_tokens": max_tokens}
    else:
        path, body = "/v1/chat/completions", {"messages": messages, "stream": True, "temperature": 0,
                                              "max_tokens": max_tokens, "model": model}
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    finish = None
    async with client.stream("POST", url + path, json=body) as response:
        response.raise_for_status()
        async for event in sse_events(response):
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - started
                text.append(piece)
                finish = choice.get("finish_reason") or finish
    # A stream cut by max_tokens has exactly max_tokens tokens; one that stopped, its text's
    # tokens plus the stop token.
    tokens = max_tokens if finish == "length" else count_tokens("".join(text)) + 1
    return (first if first is not None else float("nan")), tokens, finish != "length"


async def server_load(url: str, api: str, model: str | None, conversations: list[list[dict]], max_tokens: int,
                      count_tokens) -> LoadResult:
    limits = httpx.Limits(max_connections=len(conversations) + 4, max_keepalive_connections=len(conversations) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *[_one_stream(client, url, api, model, c, max_tokens, count_tokens) for c in conversations]
        )
        wall = time.perf_counter() - started
    tokens = sum(r[1] for r in results)
    return LoadResult(tokens / wall, [r[0] for r in results], tokens, sum(r[2] for r in results))


def prompt_counters(url: str) -> tuple[float, float]:
    """(prompt tokens, of which taken from the prefix cache) so far, from the server's /metrics."""
    values = {"glm_api_chat_prompt_tokens_total": 0.0, "glm_api_chat_cached_prompt_tokens_total": 0.0}
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return float("nan"), float("nan")
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values["glm_api_chat_prompt_tokens_total"], values["glm_api_chat_cached_prompt_tokens_total"]


def static_generate(model, prompt_ids: list[list[int]], max_tokens: int, pad_id: int) -> float:
    """Tokens/s of one ``generate`` over the whole left-padded batch, exactly max_tokens each."""
    import torch

    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    device = next(model.parameters()).device
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_tokens,
                       min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
    return len(prompt_ids) * max_tokens / (time.perf_counter() - started)


def generate_batch(model, prompt_ids: list[list[int]], max_tokens: int, pad_id: int) -> float:
    """Tokens/s of transformers' own continuous batching (paged attention) in this process."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
    started = time.perf_counter()
    out = model.generate_batch(prompt_ids, generation_config=config)
    return sum(len(o.generated_tokens) for o in out.values()) / (time.perf_counter() - started)


def load_model(args):
    """The chat model the server loads with these settings, loaded here the same way."""
    import torch

    from glm_api.config import Settings
    from glm_api.devices import resolve_devices, resolve_dtype
    from glm_api.families.detect import load_chat_model
    from glm_api.registry import resolve_model_sources

    overrides = {"cache_dir": args.cache_dir, "dtype": args.dtype, "device": args.device or "cpu"}
    if args.chat_model:
        overrides["chat_model"] = args.chat_model
    settings = Settings(**overrides)
    source = resolve_model_sources(settings).chat
    device = resolve_devices(settings.device)[0]  # the limit: one model on the first device
    loaded = load_chat_model(source.path, device, resolve_dtype(settings.dtype, device), settings.cache_dir)
    torch.set_grad_enabled(False)
    return loaded, source


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start `python api.py` on a free port)")
    p.add_argument("--api", choices=["seed", "openai"], default="seed", help="/chat or /v1/chat/completions")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated stream counts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs per figure; the best is kept")
    p.add_argument("--dtype", default="float32", help="for both the server and the in-process limit")
    p.add_argument("--device", help="the server's --device (default: cpu); a list runs one chat replica per device; "
                                    "the in-process limit runs on the first")
    p.add_argument("--chat-model", help="model path (default: what the server picks, the packaged SmolLM2)")
    p.add_argument("--cache-dir", default=str(Path(".cache/glm-api").resolve()))
    p.add_argument("--transformers-serve", action="store_true",
                   help="also run the load against `transformers serve --continuous-batching` (same model)")
    p.add_argument("--serve-dtypes", default="bfloat16,float32",
                   help="--dtype values for transformers serve, one run each (bfloat16: its default on "
                        "SmolLM2's published weights)")
    p.add_argument("--generate-batch", action="store_true",
                   help="also time transformers' in-process continuous batching (model.generate_batch)")
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    loaded, source = load_model(args)
    template = loaded.template
    tokenizer = template.tokenizer
    count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    conversations = prompts(max(levels))
    prompt_ids = [template.encode_messages(c) for c in conversations]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(template.stop_token_ids)
    print(f"model {source.name} ({source.path}), {args.dtype}, server --device {args.device or 'cpu'}; "
          f"{machine_line()}", flush=True)

    static_generate(loaded.model, prompt_ids[:2], 4, pad_id)  # warm up
    rows = []
    server_args = ["--dtype", args.dtype, "--cache-dir", args.cache_dir, "--max-running", str(max(max(levels), 32)),
                   "--log-level", "warning"]
    if args.chat_model:
        server_args += ["--chat-model", args.chat_model]
    if args.device:
        server_args += ["--device", args.device]
    peers: dict[str, dict[int, LoadResult]] = {}

    cached_share: dict[int, float] = {}  # of glm-api's prompt tokens, taken from its prefix cache

    def run_levels(url: str, api: str, model: str | None, label: str, limits: bool = True) -> dict[int, tuple[LoadResult, float]]:
        asyncio.run(server_load(url, api, model, conversations[:2], 4, count_tokens))  # warm up
        out = {}
        for n in levels:
            best: LoadResult | None = None
            limit = float("nan")
            prompt_before, cached_before = prompt_counters(url)
            for _ in range(args.repeats):
                if limits:
                    limit = max(0.0 if limit != limit else limit,
                                static_generate(loaded.model, prompt_ids[:n], args.max_tokens, pad_id))
                result = asyncio.run(server_load(url, api, model, conversations[:n], args.max_tokens, count_tokens))
                if best is None or result.tokens_per_s > best.tokens_per_s:
                    best = result
            out[n] = (best, limit)
            prompt_after, cached_after = prompt_counters(url)
            if label == "glm-api" and prompt_after > prompt_before:
                cached_share[n] = (cached_after - cached_before) / (prompt_after - prompt_before)
            print(f"  {label} N={n}: {best.tokens_per_s:.1f} tok/s, limit {limit:.1f} "
                  f"({best.stopped_early} stopped before max_tokens)", flush=True)
        return out

    if args.url:
        ours = run_levels(args.url, args.api, None, "glm-api")
    else:
        with running_server(glm_api_command(server_args), ready_path="/ready", log_name="glm-api-bench") as server:
            ours = run_levels(server.url, args.api, None, "glm-api")
    if args.transformers_serve:
        folder = loaded.model.name_or_path or str(source.path)
        for dtype in args.serve_dtypes.split(","):
            command = ["transformers", "serve", "--continuous-batching", "--device", "cpu", "--dtype", dtype,
                       "--host", "127.0.0.1", "--port", "{port}", folder]
            with running_server(command, ready_path="/health", log_name=f"transformers-serve-{dtype}") as peer:
                label = f"transformers serve {dtype}"
                peers[dtype] = {n: r for n, (r, _) in run_levels(peer.url, "openai", folder, label, limits=False).items()}
    batch_api: dict[int, float] = {}
    if args.generate_batch:  # last: it may leave the model set up for paged attention
        for n in levels:
            batch_api[n] = generate_batch(loaded.model, prompt_ids[:n], args.max_tokens, pad_id)
            print(f"  generate_batch N={n}: {batch_api[n]:.1f} tok/s", flush=True)

    for n in levels:
        result, limit = ours[n]
        row = [n, result.tokens_per_s, limit, result.tokens_per_s / limit,
               percentile(result.ttft, 50), percentile(result.ttft, 95), cached_share.get(n, float("nan"))]
        for runs in peers.values():
            peer = runs[n]
            row += [peer.tokens_per_s, percentile(peer.ttft, 50), result.tokens_per_s / peer.tokens_per_s]
        if batch_api:
            row += [batch_api[n], batch_api[n] / limit]
        rows.append(row)
    headers = ["streams", "glm-api tok/s", "static generate tok/s", "ratio", "TTFT p50 s", "TTFT p95 s",
               "prompt tokens cached"]
    for dtype in peers:
        headers += [f"serve --cb {dtype} tok/s", "its TTFT p50 s", "glm-api / it"]
    if batch_api:
        headers += ["generate_batch tok/s", "generate_batch / static"]
    print()
    print(f"{args.max_tokens} tokens per stream, greedy, {args.dtype}, best of {args.repeats}")
    print_table(headers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
