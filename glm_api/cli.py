"""Command line: flags override ``GLM_API_*`` environment variables, which override defaults."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys

from pydantic import ValidationError

from glm_api.config import Settings
from glm_api.model_sources import StartupError, resolve_model_sources

log = logging.getLogger("glm_api")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python api.py",
        description="glm-api: GLM chat and text-embedding models behind the GLM-API and OpenAI HTTP APIs. "
        "Every flag can also be set as an environment variable GLM_API_<FLAG> (e.g. GLM_API_PORT).",
    )
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (default 8100)")
    p.add_argument("--chat-model", metavar="PATH", help="chat model folder or .gguf file (default ./model/chatglm3-6b-32k, else the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--chat-model-name", metavar="NAME", help="name clients use for the chat model (default: the folder name)")
    p.add_argument("--embedding-model", metavar="NAME=PATH", action="append", dest="embedding_models",
                   help="an embedding model folder, repeatable (default ./model/text2vec-*, else the packaged all-MiniLM-L6-v2)")
    p.add_argument("--rerank-model", metavar="NAME=PATH", action="append", dest="rerank_models",
                   help="a cross-encoder reranker folder, repeatable (default ./model/bge-reranker-*; without one, "
                   "/rerank and /score use an embedding model's cosine similarity)")
    p.add_argument("--ptuning", metavar="NAME=PATH", action="append", dest="ptuning",
                   help="a P-Tuning v2 checkpoint of the ChatGLM3 chat model, served as NAME (repeatable); its "
                   "prefix takes pre_seq_len tokens of the KV cache, once for all requests")
    p.add_argument("--lora", metavar="NAME=PATH", action="append", dest="lora",
                   help="a peft LoRA adapter folder of the chat model, served as model NAME (repeatable; "
                   "GLM_API_LORA takes a comma-separated list)")
    p.add_argument("--allow-runtime-lora", action="store_true", default=None,
                   help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default)")
    p.add_argument("--model-dir", metavar="DIR", help="where the seed's model folders are looked for (default ./model)")
    p.add_argument("--disable-chat", action="store_true", default=None, help="serve embeddings only")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto); a comma-separated list (cuda:0,cuda:1) "
                   "or all (every visible GPU) runs one chat replica per device")
    p.add_argument("--device-map", choices=["none", "auto", "balanced"],
                   help="auto: split one chat model by layers over the --device list, filling the devices in order; "
                   "balanced: about evenly; saves memory, not time (default none: one replica per device)")
    p.add_argument("--embedding-device", help="device of the embedding models (default: the first --device)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="default auto: bf16/fp16 on GPU, fp32 on CPU")
    p.add_argument("--quantize", choices=["none", "int8", "w8a8", "int4"],
                   help="chat model decoder weights in int8 (weight-only), w8a8 (int8 activations on wide steps) or int4, quantised while loading (default none)")
    p.add_argument("--cache-dir", metavar="DIR", help="where converted GGUF models and start-up kernel timings are kept (default .cache/glm-api)")
    p.add_argument("--max-running", type=int, help="chat sequences decoded together (default 32)")
    p.add_argument("--max-waiting", type=int, help="chat requests queued beyond those; more get 429 (default 256)")
    p.add_argument("--prefix-cache-tokens", type=int,
                   help="tokens of finished requests' KV blocks kept for later prompts that begin the same way; 0: off (default 4096)")
    p.add_argument("--kv-cache-tokens", type=int,
                   help="KV cache size in tokens, all requests together (default: 65536 on CPU; on GPU what memory allows)")
    p.add_argument("--kv-block-size", type=int, help="tokens per KV cache block (default 16)")
    p.add_argument("--prefill-chunk-tokens", type=int,
                   help="prompt tokens prefilled per engine step between decode steps (default 512)")
    p.add_argument("--prefill-time-share", type=float,
                   help="while other requests decode or wait, the share of the engine's time long prompts' chunks get (default 0.15; 1: no pacing)")
    p.add_argument("--prefill-step-ms", type=float,
                   help="how long a step carrying a long prompt's chunk may last, so a newcomer waits little (default 500)")
    p.add_argument("--compile-decode", choices=["auto", "on", "off"],
                   help="run decode steps through torch.compile, compiled at start-up for each batch bucket "
                   "(default auto: on for CUDA, off on CPU)")
    p.add_argument("--cpu-kernels", choices=["auto", "off"],
                   help="CPU float32: projections through oneDNN's packed linear where it times faster at start-up "
                   "(default auto; costs a second copy of the weights)")
    p.add_argument("--kernel-timings", choices=["cached", "fresh"],
                   help="kernel choices timed at start-up (--cpu-kernels, --quantize) are kept under --cache-dir and "
                   "reused on the same machine, torch and thread count (default cached); fresh: time them again")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"],
                   help="on CUDA, capture decode steps as CUDA graphs per batch bucket (default auto: on)")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="share of the GPU's memory for the weights and the KV cache (default 0.9)")
    p.add_argument("--api-key", metavar="KEY", action="append", dest="api_keys",
                   help="require 'Authorization: Bearer KEY' (repeatable); GLM_API_API_KEYS takes a comma-separated list")
    p.add_argument("--api-key-file", metavar="FILE", help="a file of API keys, one per line")
    p.add_argument("--cors-origin", metavar="ORIGIN", action="append", dest="cors_origins",
                   help="allow browser requests from this origin (repeatable; default: CORS off)")
    p.add_argument("--trust-remote-code", metavar="NAME", action="append", dest="trust_remote_code",
                   help="let the chat model served as NAME run the Python code in its folder (off by default)")
    p.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default 4 MiB)")
    p.add_argument("--shutdown-grace-seconds", type=float,
                   help="on SIGTERM, time running requests get to finish (default 30)")
    p.add_argument("--data-dir", metavar="DIR", help="where the Batch API keeps its database and files (default .data/glm-api)")
    p.add_argument("--batch-max-file-bytes", type=int, help="largest file /v1/files takes (default 100 MiB)")
    p.add_argument("--batch-max-lines", type=int, help="most lines of one batch input file (default 50000)")
    p.add_argument("--batch-max-running", type=int,
                   help="chat slots batch lines keep while interactive requests are present; idle, they use up to "
                   "--max-running (default: a quarter of --max-running)")
    p.add_argument("--responses-db", metavar="FILE",
                   help="SQLite database of stored /v1/responses (default <data-dir>/responses.sqlite3)")
    p.add_argument("--responses-max-bytes", type=int,
                   help="stored responses' JSON kept in all; beyond it the oldest go (default 1 GiB)")
    p.add_argument("--responses-max-age-hours", type=float,
                   help="stored responses older than this go (default 720: 30 days)")
    p.add_argument("--no-playground", action="store_false", default=None, dest="playground",
                   help="do not serve the web playground at / (GLM_API_PLAYGROUND=false does the same)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def settings_from_args(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"glm-api: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sources = resolve_model_sources(settings)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1

    if settings.api_key_file is not None and not settings.api_key_file.is_file():
        log.error("cannot start: API key file %s does not exist", settings.api_key_file)
        return 1
    if not settings.all_api_keys() and not _is_loopback(settings.host):
        log.warning(
            "no API key is set and the server listens on %s: anyone who can reach it can use it "
            "(set --api-key or GLM_API_API_KEYS)", settings.host,
        )

    from sse_starlette.sse import AppStatus

    from glm_api.app import create_app

    # On SIGTERM, let running streams finish (uvicorn bounds the wait by the grace period)
    # instead of sse-starlette cutting them the moment shutdown starts.
    AppStatus.disable_automatic_graceful_drain()

    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, sources=sources, on_fatal=on_fatal)
    # One worker: one copy of the model; concurrency comes from batching in the engines.
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, workers=1,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises a handled SIGTERM once it has shut down, to reach the handler that was
    # there before; make that one a no-op so a graceful stop exits 0 rather than "killed".
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if fatal:
        log.error("exiting: %s", fatal[0])
        return 1
    return 0
