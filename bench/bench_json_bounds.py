"""What the JSON bounds (glm_api/serving/json_bounds.py) cost the grammar, against the same grammar unbounded.

    python bench/bench_json_bounds.py [--cache-dir .cache/glm-api] [--repeats 5]

For each schema, both grammars are compiled against the packaged SmolLM2 vocabulary (as the
engine compiles them) and a fixed answer valid for both is replayed token by token: the mask of
each step filled, then the token consumed. Rounds are interleaved and the best of ``--repeats``
kept (the CPU may be shared); the ratio is bounded / unbounded, per token and for the first
matcher of a freshly compiled grammar.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_structured import ORDER  # noqa: E402
from bench.common import machine_line, print_table  # noqa: E402

CAPITAL = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                            "population_millions": {"type": "number"}},
           "required": ["city", "country", "population_millions"], "additionalProperties": False}
CASES = [
    ("Capital (pydantic float)", "json_schema", CAPITAL,
     '{"city":"Paris","country":"France","population_millions":2.1234567}'),
    ("order (bench_structured)", "json_schema", ORDER,
     '{"order_id":42,"customer":{"name":"Ann","email":"a@b.c","vip":true},"items":[{"sku":"A1","quantity":2,'
     '"unit_price":9.99}],"currency":"EUR","status":"paid","shipping_address":"1 Main St","gift":false,'
     '"notes":"none","total":19.98}'),
    ("json_object", "json_object", None,
     '{"setup":{"why":["cats",1,2.5,null]},"punchline":"Because it was purr-fect, 12345."}'),
]


def replay(compiled, ids: list[int]) -> tuple[float, float]:
    """(seconds to the first matcher, seconds per token: mask then consume)."""
    started = time.perf_counter()
    matcher = compiled.matcher()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for token in ids:
        matcher.compute_bitmask()
        if not matcher.consume_token(token):
            raise SystemExit(f"the replayed answer does not fit the grammar: {matcher.get_error()}")
    return first, (time.perf_counter() - started) / len(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=str(Path(".cache/glm-api").resolve()))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    from glm_api.config import Settings
    from glm_api.devices import resolve_device
    from glm_api.engines.grammar import Constraint, GrammarCompiler
    from glm_api.families.detect import load_chat_model
    from glm_api.registry import resolve_model_sources
    from glm_api.serving.json_bounds import bounded_constraint

    settings = Settings(cache_dir=args.cache_dir, device="cpu", dtype="float32")
    source = resolve_model_sources(settings).chat
    loaded = load_chat_model(source.path, resolve_device("cpu"), torch.float32, settings.cache_dir)
    compiler = GrammarCompiler(loaded.template, loaded.model.config.get_text_config().vocab_size)
    rows = []
    for name, kind, schema, answer in CASES:
        free = Constraint(kind, json.dumps(schema) if schema is not None else "")
        grammars = {"unbounded": compiler.compile(free), "bounded": compiler.compile(bounded_constraint(free))}
        ids = compiler.tokenizer.tokenize_str(answer)
        best = {label: (float("inf"), float("inf")) for label in grammars}
        for _ in range(args.repeats):
            for label, compiled in grammars.items():
                first, per_token = replay(compiled, ids)
                best[label] = (min(best[label][0], first), min(best[label][1], per_token))
        (f0, t0), (f1, t1) = best["unbounded"], best["bounded"]
        rows.append([name, len(ids), f"{t0 * 1e6:.0f}", f"{t1 * 1e6:.0f}", f"{t1 / t0:.2f}",
                     f"{f0 * 1e3:.2f}", f"{f1 * 1e3:.2f}", f"{f1 / f0:.2f}"])
    print(machine_line())
    print_table(["schema", "tokens", "us/token free", "us/token bounded", "ratio",
                 "first matcher ms free", "bounded", "ratio"], rows)


if __name__ == "__main__":
    main()
