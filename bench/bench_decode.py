"""One stream against the memory-bandwidth limit, in one run (issue 24).

    python bench/bench_decode.py                    # every figure, ~3 minutes on the 2-core dev CPU
    python bench/bench_decode.py --tokens 64        # shorter streams

Decoding one token reads every weight once, so one stream cannot go faster than memory
bandwidth / weight bytes. Measured here, in the same process and minutes:

1. bandwidth: a 256 MiB float32 matrix-vector product (``torch.mv``), best of several;
2. the limit: the default model (packaged SmolLM2-135M, float32) reads its weight bytes per
   token (each tensor once: tied embeddings count once), so limit = bandwidth / bytes;
3. one stream through the engine (no HTTP): decode tokens/s after the first token, and its share
   of the limit (issue goal >= 0.85);
4. the fixed cost of a step: a random 2-layer model with the same tokenizer, ms per token
   (goal <= 1 ms);
5. 32 streams: total tokens/s (goal >= 1.0x of main's path).

Each engine figure is measured twice in the same run over the same weights: main's path (every
step through the general packed step, ``F.linear``) and this branch's (the lean decode step,
projections through oneDNN's packed linear where they timed faster at start-up, as the server
does by default); ``--compiled`` adds 32 streams through the compiled decode step.

Streams run to ``--tokens`` (stop tokens are ignored, as a random model's would be anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the server's entry points do (glm_api/huge_pages.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import machine_line, print_table

CPU = torch.device("cpu")
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


def bandwidth_gbs(mib: int = 256, reps: int = 12, device: torch.device = CPU) -> float:
    """GB/s (10^9) of a float32 matrix-vector product over a ``mib`` MiB matrix: the rate one
    stream's decode reads weights at, at best."""
    n = int((mib * 2**20 / 4) ** 0.5)
    matrix, vector = torch.randn(n, n, device=device), torch.randn(n, device=device)
    out = torch.empty(n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mv(matrix, vector, out=out)
    best = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        torch.mv(matrix, vector, out=out)
        sync()
        best = min(best, time.perf_counter() - start)
    return matrix.numel() * 4 / best / 1e9


def projections_ms(model: torch.nn.Module, passes: int = 12) -> float:
    """Best ms of one pass over every projection (each ``nn.Linear``'s own forward: the packed
    path where it was chosen) at one row, in a thread as the engine runs them: what the weights
    alone cost one stream's step, without attention, norms or bookkeeping."""
    import threading

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in linears}
    best = [float("inf")]

    def run():
        with torch.inference_mode():
            for _ in range(passes):
                start = time.perf_counter()
                for m in linears:
                    m.forward(inputs[m.in_features])
                best[0] = min(best[0], time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return best[0] * 1000


def in_passing_thread(fn, *args, **kwargs):
    """Torch work in a thread that ends with it, as the server loads its models (the engine's
    thread then holds the only OpenMP team: glm_api/passing_thread.py); a checkout without it
    runs ``fn`` here."""
    try:
        from glm_api.passing_thread import run_in_passing_thread
    except ImportError:
        return fn(*args, **kwargs)
    return run_in_passing_thread(fn, *args, **kwargs)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every parameter and buffer once (a tied tensor once)."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


class NoStop:
    """The model's template without stop tokens: streams run to max_tokens."""

    def __init__(self, template) -> None:
        self._template = template
        self.stop_token_ids = frozenset()

    def __getattr__(self, name: str):
        return getattr(self._template, name)


def make_engine(loaded, **kwargs):
    from glm_api.engines.chat_engine import TransformersChatEngine

    engine = TransformersChatEngine(loaded, "bench", **kwargs)
    engine.template = NoStop(loaded.template)
    return engine


async def _stream(engine, prompt: list[int], tokens: int, request_id: str) -> tuple[int, float, float]:
    """(tokens, time of the first chunk, time of the last)."""
    from glm_api.engines.base import SamplingParams

    first = last = 0.0
    count = 0
    async for chunk in engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0.0), request_id):
        last = time.perf_counter()
        first = first or last
        count += len(chunk.token_ids)
    return count, first, last


def decode_rate(engine, prompts: list[list[int]], tokens: int) -> float:
    """Total decode tokens/s of ``prompts`` streamed together: tokens after each stream's first,
    over the time from the first stream's first token to the last one's end."""

    async def run():
        return await asyncio.gather(*[_stream(engine, p, tokens, f"r{i}") for i, p in enumerate(prompts)])

    outs = asyncio.run(run())
    decoded = sum(n - 1 for n, _, _ in outs)
    return decoded / (max(t for _, _, t in outs) - max(f for _, f, _ in outs))


def tiny_model(template):
    """A random 2-layer Llama with SmolLM2's tokenizer: what a step costs beside the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from glm_api.families.base import LoadedChatModel

    tokenizer = template.tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedChatModel(model, template, 2048, "transformers", "random 2-layer Llama")


def engine_options(compiled: bool) -> dict:
    import inspect

    from glm_api.engines.chat_engine import TransformersChatEngine

    if "compile_decode" not in inspect.signature(TransformersChatEngine).parameters:
        return {}  # a checkout before the compiled step: both runs are the eager engine
    return {"compile_decode": compiled}


def variant(loaded, new: bool, pack: bool = True, **kwargs):
    """An engine on today's main path (``new`` False: the general packed step, ``F.linear``) or
    this branch's (the lean decode step, projections packed where they time faster), over the
    same loaded weights."""
    try:
        from glm_api.families.dense_kernels import pack_linears, unpack_linears
    except ImportError:  # a checkout before the packed projections
        pack_linears = unpack_linears = None
    if unpack_linears is not None:
        unpack_linears(loaded.model)
        if new and pack:
            rows = kwargs.get("max_running", 32)
            in_passing_thread(pack_linears, loaded.model, widths=(1, rows, 512), head_rows=rows)
    engine = in_passing_thread(make_engine, loaded, **kwargs)
    direct = getattr(getattr(engine.runner, "decode", None), "direct", None)
    if new and pack and hasattr(direct, "fuse_projections"):  # as the server does
        rows = kwargs.get("max_running", 32)
        in_passing_thread(direct.fuse_projections, loaded.model, widths=(1, rows))
    if not new and getattr(engine.runner, "decode", None) is not None:
        engine.runner.decode = None  # every step through the general one, as on main
    return engine


def one_stream(loaded, prompt, tokens: int, new: bool, runs: int = 2, **kwargs) -> float:
    engine = variant(loaded, new, max_running=kwargs.pop("max_running", 32), **kwargs)
    engine.start()
    try:
        decode_rate(engine, [prompt], 8)  # warm up
        return max(decode_rate(engine, [prompt], tokens) for _ in range(runs))
    finally:
        engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96, help="tokens per stream (default 96)")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams of the batched figure (default 32)")
    parser.add_argument("--cache-dir", default=".cache/glm-api", help="where the converted SmolLM2 is cached")
    parser.add_argument("--compiled", action="store_true",
                        help="also 32 streams through the compiled decode step (minutes of start-up on a CPU)")
    args = parser.parse_args()

    from glm_api.families.detect import load_chat_model
    from glm_api.families.transformers_lm import packaged_chat_gguf

    print(machine_line())
    started = time.monotonic()
    rows = []
    gbs = in_passing_thread(bandwidth_gbs)
    rows.append(("bandwidth: 256 MiB fp32 matrix-vector product", f"{gbs:.1f} GB/s", ""))

    loaded = in_passing_thread(load_chat_model, packaged_chat_gguf(), CPU, torch.float32, Path(args.cache_dir))
    size = weight_bytes(loaded.model)
    limit = gbs * 1e9 / size
    rows.append(("limit: SmolLM2-135M fp32", f"{limit:.1f} tok/s", f"{size / 1e6:.0f} MB of weights per token"))
    prompt = loaded.template.encode_messages(STORY)
    rate = {new: one_stream(loaded, prompt, args.tokens, new) for new in (False, True)}
    ms = projections_ms(loaded.model)  # packed as the last engine left them (this branch's choice)
    rows.append(("projections alone, one row (weights, no step)", f"{ms:.1f} ms",
                 f"{size / ms / 1e6:.1f} GB/s; share {1000 / ms / limit:.2f} at best"))
    rows.append(("one stream, SmolLM2 fp32, main's path", f"{rate[False]:.1f} tok/s", f"share {rate[False] / limit:.2f}"))
    rows.append(("one stream, SmolLM2 fp32, this branch", f"{rate[True]:.1f} tok/s",
                 f"share of the limit {rate[True] / limit:.2f} (goal >= 0.85); {rate[True] / rate[False]:.2f}x main"))

    tiny = in_passing_thread(tiny_model, loaded.template)
    ms = {new: 1000 / one_stream(tiny, prompt, args.tokens * 2, new, runs=3, max_running=4) for new in (False, True)}
    rows.append(("one stream, random 2-layer model, main's path", f"{ms[False]:.2f} ms/token", ""))
    rows.append(("one stream, random 2-layer model, this branch", f"{ms[True]:.2f} ms/token", "goal <= 1 ms"))

    from bench.bench_chat import prompts as conversations

    many = [loaded.template.encode_messages(c) for c in conversations(args.streams)]
    variants = [("main's path", False, {}), ("this branch", True, {})]
    if args.compiled:
        variants.append(("this branch, compiled decode", True, engine_options(True)))
    rates = {}
    for name, new, options in variants:
        engine = variant(loaded, new, max_running=args.streams, **options)
        engine.start()
        try:
            decode_rate(engine, many[:2], 4)
            rates[name] = decode_rate(engine, many, args.tokens)
        finally:
            engine.stop()
    for name, _, _ in variants:
        note = "baseline, same run" if name == "main's path" else f"{rates[name] / rates[variants[0][0]]:.2f}x (goal >= 1.0x)"
        rows.append((f"{args.streams} streams, {name}", f"{rates[name]:.1f} tok/s", note))
    print_table(("figure", "value", "note"), rows)
    print(f"{time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
