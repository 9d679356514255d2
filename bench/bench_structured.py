"""Constrained decoding's cost: 32 streams bound by a realistic JSON Schema against the same load free.

    python bench/bench_structured.py                 # starts `python api.py --dtype float32`
    python bench/bench_structured.py --url http://127.0.0.1:8100

Each round sends ``--streams`` concurrent streamed chat requests twice, free and with
``response_format: json_schema`` (an order: 9 fields, a nested object and an array of objects),
and counts completion tokens from ``usage`` over the wall time; rounds are interleaved and the
best of ``--repeats`` kept, since the CPU may be shared. The ratio is constrained / free (goal:
0.85 or more). In this process it also times the grammar: building the vocabulary for the
grammar library, compiling the schema cold, and finding it in the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from bench.common import glm_api_command, machine_line, print_table, running_server  # noqa: E402

ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1, "maximum": 999999},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40}, "email": {"type": "string", "maxLength": 60},
                           "vip": {"type": "boolean"}},
            "required": ["name", "email", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 12}, "quantity": {"type": "integer", "minimum": 1,
                                                                                          "maximum": 99},
                               "unit_price": {"type": "number", "minimum": 0}},
                "required": ["sku", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "status": {"enum": ["new", "paid", "shipped", "delivered"]},
        "shipping_address": {"type": "string", "maxLength": 80},
        "gift": {"type": "boolean"},
        "notes": {"type": "string", "maxLength": 100},
        "total": {"type": "number", "minimum": 0},
    },
    "required": ["order_id", "customer", "items", "currency", "status", "shipping_address", "gift", "total"],
    "additionalProperties": False,
}
TOPICS = ["a bakery order of bread and cakes", "three books sent to Lyon", "a laptop and a mouse for an office",
          "garden tools for a spring sale", "a birthday gift of flowers", "coffee beans in bulk"]


def body(i: int, max_tokens: int, constrained: bool) -> dict:
    messages = [{"role": "user", "content": f"Write the order record for {TOPICS[i % len(TOPICS)]}."}]
    out = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0,
           "stream_options": {"include_usage": True}}
    if constrained:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}}
    return out


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[int, str, str]:
    tokens, text, finish = 0, [], ""
    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                text.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
    return tokens, "".join(text), finish


async def load(url: str, streams: int, max_tokens: int, constrained: bool) -> tuple[float, int, int]:
    """Completion tokens/s over the wall time, and how many answers parsed as JSON / finished."""
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*[one(client, url, body(i, max_tokens, constrained)) for i in range(streams)])
        wall = time.perf_counter() - started
    parsed = 0
    for _, text, _ in results:
        try:
            json.loads(text)
            parsed += 1
        except json.JSONDecodeError:
            pass
    return sum(r[0] for r in results) / wall, parsed, sum(r[2] == "stop" for r in results)


def grammar_timings(cache_dir: str) -> tuple[float, float, float, float]:
    from glm_api.config import Settings
    from glm_api.devices import resolve_device
    from glm_api.engines.base import Constraint
    from glm_api.engines.grammar import GrammarCompiler
    from glm_api.families.detect import load_chat_model
    from glm_api.registry import resolve_model_sources

    import torch

    settings = Settings(cache_dir=cache_dir, device="cpu", dtype="float32")
    source = resolve_model_sources(settings).chat
    loaded = load_chat_model(source.path, resolve_device("cpu"), torch.float32, settings.cache_dir)
    compiler = GrammarCompiler(loaded.template, loaded.model.config.get_text_config().vocab_size)
    started = time.perf_counter()
    compiler.tokenizer  # noqa: B018 - built on first use
    vocabulary = time.perf_counter() - started
    constraint = Constraint("json_schema", json.dumps(ORDER))
    started = time.perf_counter()
    grammar = compiler.compile(constraint)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    compiler.compile(constraint)
    cached = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(32):
        grammar.matcher()
    matchers = (time.perf_counter() - started) / 32
    return vocabulary, cold, cached, matchers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start `python api.py --dtype float32`)")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache-dir", default=str(Path(".cache/glm-api").resolve()))
    args = p.parse_args()

    vocabulary, cold, cached, matcher = grammar_timings(args.cache_dir)
    print(f"grammar: vocabulary {vocabulary * 1000:.0f} ms once per model; order schema compiled cold "
          f"{cold * 1000:.1f} ms, cached {cached * 1000:.3f} ms; a matcher {matcher * 1000:.2f} ms")

    def run(url: str) -> None:
        best = {False: (0.0, 0, 0), True: (0.0, 0, 0)}
        asyncio.run(load(url, 2, 8, True))  # warm-up
        for _ in range(args.repeats):
            for constrained in (False, True):
                result = asyncio.run(load(url, args.streams, args.max_tokens, constrained))
                print(f"  {'constrained' if constrained else 'free'}: {result[0]:.1f} tok/s, "
                      f"{result[1]} of {args.streams} parse, {result[2]} finished")
                if result[0] > best[constrained][0]:
                    best[constrained] = result
        free, bound = best[False], best[True]
        print(f"\n{args.streams} streams, up to {args.max_tokens} tokens, greedy, best of {args.repeats}")
        print_table(
            ["load", "tok/s", "answers that parse as JSON", "finished (stop)"],
            [["free", f"{free[0]:.1f}", free[1], free[2]], ["json_schema", f"{bound[0]:.1f}", bound[1], bound[2]]],
        )
        print(f"\nconstrained / free: {bound[0] / free[0]:.2f} (goal: at least 0.85)")
        print(machine_line())

    if args.url:
        run(args.url)
    else:
        command = glm_api_command(["--dtype", "float32", "--cache-dir", args.cache_dir])
        with running_server(command, ready_path="/ready", log_name="bench-structured") as server:
            run(server.url)


if __name__ == "__main__":
    main()
