"""What Ray Serve's proxy costs: the same loads against the single-process server and Ray Serve.

    python bench/bench_ray_serve.py                  # single process, Ray Serve 1 and 2 replicas
    python bench/bench_ray_serve.py --haproxy        # also 2 replicas behind Serve's HAProxy mode
    python bench/bench_ray_serve.py --repeats 3 --skip-chat

Needs ``pip install -r requirements-ray.txt``. Each target is started, measured and stopped in
turn, on this machine, with the default models:

- ``single``: ``python api.py`` (uvicorn, one process, torch on every core);
- ``ray 1``: ``serve run`` of glm_api.ray_serve:build with 1 replica holding every core;
- ``ray 2``: 2 replicas, the cores split between them (``num_cpus`` and torch threads each);
- ``ray 2 haproxy`` (``--haproxy``): the same with ``RAY_SERVE_ENABLE_HA_PROXY=1``.

Ray runs as a local cluster kept on 127.0.0.1. Loads, each the best of ``--repeats`` runs:

- chat: 32 concurrent greedy ``/chat`` streams of ``--max-tokens`` tokens (bench_chat.py's
  prompts): completion tokens/s and time to first token;
- embeddings: 512 sentences as 32 clients x 1 sentence and 4 clients x 32 (bench_embeddings.py);
- small requests: 32 clients sending ``/tokenize`` of one short sentence back to back,
  requests/s: almost nothing but HTTP and the proxy.

Every figure is printed with its ratio to the single-process server. On one machine the
replicas share its cores, so more replicas cannot add compute: the ratios show the proxy's
overhead. Across hosts each replica brings its own cores (or GPU), so throughput grows with
replicas, less that overhead (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.bench_chat import prompts, server_load as chat_load  # noqa: E402
from bench.bench_embeddings import sentences, server_load as embedding_load  # noqa: E402
from bench.common import (  # noqa: E402
    REPO,
    RawHTTPConnection,
    Server,
    free_port,
    glm_api_command,
    machine_line,
    percentile,
    print_table,
    running_server,
    wait_ready,
)

#: A new local cluster (never one already running), its node, gRPC ports and agents on 127.0.0.1
#: (Ray otherwise takes the machine's address).
RAY_LOCAL = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}


def serve_config(port: int, replicas: int, cores: int, cache_dir: str) -> str:
    per_replica = max(1, cores // replicas)
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "glm-api", "route_prefix": "/", "import_path": "glm_api.ray_serve:build",
            "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
            "args": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": per_replica},
                     "cache_dir": cache_dir, "log_level": "warning"},
        }],
    }
    path = Path(tempfile.mkdtemp(prefix="glm-api-ray-bench-")) / "serve.json"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON: serve run reads it
    return str(path)


async def small_requests(url: str, clients: int, per_client: int) -> float:
    body = json.dumps({"prompt": "A short sentence to tokenize."}).encode()

    async def client() -> None:
        connection = RawHTTPConnection(url)
        try:
            for _ in range(per_client):
                status, payload = await connection.post_json("/tokenize", body)
                if status != 200:
                    raise RuntimeError(f"/tokenize answered {status}: {payload[:300]!r}")
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return clients * per_client / (time.perf_counter() - started)


def measure(url: str, args, count_tokens) -> dict[str, float]:
    conversations = prompts(32)
    texts = sentences(512)
    out: dict[str, float] = {}
    asyncio.run(chat_load(url, "seed", None, conversations[:2], 4, count_tokens))  # warm up
    asyncio.run(embedding_load(url, "seed", texts[:64], 8, 8))
    for _ in range(args.repeats):
        if not args.skip_chat:
            chat = asyncio.run(chat_load(url, "seed", None, conversations, args.max_tokens, count_tokens))
            if chat.tokens_per_s > out.get("chat tok/s", 0.0):
                out["chat tok/s"] = chat.tokens_per_s
                out["chat TTFT p50 s"] = percentile(chat.ttft, 50)
        for label, clients, per_request in [("emb 32x1 sent/s", 32, 1), ("emb 4x32 sent/s", 4, 32)]:
            out[label] = max(out.get(label, 0.0), asyncio.run(embedding_load(url, "seed", texts, clients, per_request)))
        out["small req/s"] = max(out.get("small req/s", 0.0), asyncio.run(small_requests(url, 32, args.small_requests)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="runs per figure; the best is kept")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per chat stream")
    p.add_argument("--small-requests", type=int, default=25, help="/tokenize calls per client (32 clients)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores the replicas share")
    p.add_argument("--cache-dir", default=str(Path(".cache/glm-api").resolve()))
    p.add_argument("--haproxy", action="store_true", help="also 2 replicas with RAY_SERVE_ENABLE_HA_PROXY=1")
    p.add_argument("--skip-chat", action="store_true")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from glm_api.families.transformers_lm import gguf_cache_folder, packaged_chat_gguf

    serve = str(Path(sys.executable).with_name("serve"))
    targets = [("single", glm_api_command(["--cache-dir", args.cache_dir, "--log-level", "warning"]), {})]
    for replicas, extra in [(1, {}), (2, {})] + ([(2, {"RAY_SERVE_ENABLE_HA_PROXY": "1"})] if args.haproxy else []):
        label = f"ray {replicas}" + (" haproxy" if extra else "")
        targets.append((label, [serve, "run", "{config}"], {**RAY_LOCAL, **extra, "_replicas": replicas}))

    print(machine_line(), flush=True)
    results: dict[str, dict[str, float]] = {}
    tokenizers: list = []

    def count_tokens(text: str) -> int:
        return len(tokenizers[0].encode(text, add_special_tokens=False))

    for label, command, env in targets:
        env = dict(env)
        replicas = env.pop("_replicas", None)
        started = time.monotonic()
        if replicas is not None:
            port = free_port()
            config = serve_config(port, replicas, args.cores, args.cache_dir)
            command = [part.replace("{config}", config) for part in command]
            context = ray_server(command, port, env)
        else:
            context = running_server(command, ready_path="/ready", log_name="glm-api-ray-bench-single")
        with context as server:
            ready = time.monotonic() - started
            if not tokenizers:  # the single-process server converted the model into the cache
                tokenizers.append(AutoTokenizer.from_pretrained(gguf_cache_folder(packaged_chat_gguf(), Path(args.cache_dir))))
            results[label] = measure(server.url, args, count_tokens)
        print(f"  {label}: ready in {ready:.1f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in results[label].items()),
              flush=True)

    base = results["single"]
    rows = []
    for key in base:
        row: list[object] = [key, base[key]]
        for label in list(results)[1:]:
            value = results[label][key]
            row += [value, value / base[key] if base[key] else float("nan")]
        rows.append(row)
    headers = ["load", "single process"]
    for label in list(results)[1:]:
        headers += [label, "/ single"]
    print()
    print(f"best of {args.repeats}; chat: 32 streams x {args.max_tokens} greedy tokens; embeddings: 512 sentences; "
          f"small: 32 clients x {args.small_requests} /tokenize; {args.cores} cores shared by the replicas")
    print_table(headers, rows)
    return 0


@contextmanager
def ray_server(command: list[str], port: int, env: dict[str, str]):
    """``serve run CONFIG`` (a local cluster) until /ready answers through its proxy on ``port``."""
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"glm-api-ray-bench-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                   stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(server.url, "/ready", process, 300, log_path)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # serve run's Ctrl-C: shuts Serve and the cluster down
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    sys.exit(main())
