"""A long conversation beside short streams: the paged KV cache's goals, measured in one run.

    python bench/bench_long_context.py                          # starts `python api.py --dtype float32`
    python bench/bench_long_context.py --long-tokens 1500       # a quick check
    python bench/bench_long_context.py --prefill-chunk-tokens 256   # unknown flags go to the server
    python bench/bench_long_context.py --url http://127.0.0.1:8100 --pid 1234

Phases, all against the same server, each baseline measured in this run (in the order (a),
(c0), (b), (c), (c1), (e0), (e)):

(a) ``--short-streams`` (16) short greedy streams alone (prompts of ~64 tokens, ``--short-max-tokens``
    each): aggregate tokens/s and per-stream inter-token gaps;
(b) the same number of short streams (new prompts of the same length) sent together with one
    ~``--long-tokens`` (6800) conversation that also generates ``--long-max-tokens``: the short
    streams' tokens/s, as a ratio to (a);
(c) ``--paused-streams`` (8) streams decoding; once each has its first tokens, a second
    ~6800-token conversation (different from the first from its first block, so no prefix-cache
    hit) arrives. Every inter-token gap that overlaps the window from its send to its first
    token counts: the longest (goal: at most 1 s), and the median against (c1). The streams'
    ``--paused-max-tokens`` (4096) must outlast the window (a warning says when one did not);
(c1) the same 8 streams (the same prompts, greedy, the same ``max_tokens``) decoding again
    after (c), without the long conversation, until each has passed the text position where
    (c)'s window closed for it. The baseline is the median of their gaps at the positions that
    overlapped (c)'s window: the same tokens of the same streams, so the same context lengths
    and the same streams decoding beside them, with only the long prefill missing (their prompts
    may now come from the prefix cache: that shortens their own prefill, before any compared
    gap). It adds about the length of (c)'s window to the run. The window is long
    (~115 s for 6800 tokens with paced prefill), and over it each stream grows from ~70 to ~1000
    tokens of context, so each decode step attends over more: a baseline taken at the start of
    the streams would count that growth as the prefill's doing. A position is an offset in the
    stream's text (characters up to the end of an event), not an event count: an event can
    carry two tokens (the detokenizer holds back part of a character; the server merges chunks
    a slow reader left queued), so event counts can drift between runs, whereas the same
    greedy text puts a token boundary at the same offset. The run says how many streams'
    texts agree with (c)'s over the compared positions (float sums differ between batch
    shapes, so a near tie can turn greedy decoding another way); where one does not, an
    offset is still nearly the same context length;
(c0) for information, as the goal was first measured: 8 other streams (new prompts of the same
    length) decoding alone over a window of ``--alone-seconds``, starting after the same
    ``--settle-tokens``, so at ~70 tokens of context; (c) / (c0) mixes the prefill's cost with
    the streams' own context growth, and has no goal;
(e) short requests arriving while a long prompt prefills: a third ~``--long-tokens``
    conversation is sent alone, and ``--late-delay`` (2) seconds later, before its first token,
    ``--short-streams`` new short streams: their time to first token p50 against (a)'s (goal:
    at most 2x), their tokens/s against (a)'s (goal: at least 0.8x), and the long prompt's time
    to first token against (e0), the same conversation's length sent alone just before (goal: at
    most 2x). ``--late-only`` runs (a), (e0), (e) and (a2), the short streams alone again after
    (e), and takes the mean of (a) and (a2) as the baseline (about five minutes): on a shared
    machine one such phase moved by up to 0.2x between runs, more than the policy does;
(d) the server's RSS (psutil, the process and its children, sampled every 0.1 s): growth from
    just before (b) to the peak during (b), against the long conversation's own KV bytes plus
    0.5 GB (10^9 bytes).

Each phase also reports the share of the machine's CPU that went to other processes (neither
the server nor this script): on a shared 2-core machine, a phase that ran beside a compiler
measures the compiler, and a ratio across such phases means little.

A gap is the time between two SSE events that carry text, as the client reads them; an event
normally carries one token (the detokenizer may hold back a piece of a multi-byte character).
Streams are cut by ``max_tokens``; ``temperature`` 0 and ``repetition_penalty`` 1, as
bench_chat.py. The goals are the issue's, for SmolLM2-135M in float32 on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import psutil

from bench.common import glm_api_command, machine_line, percentile, print_table, running_server, sse_events

#: SmolLM2-135M's KV per token when its config cannot be read: keys and values (2) x 30 layers
#: x 3 KV heads x head_dim 64 x 4 bytes (float32) = 46080 bytes.
SMOLLM2_FP32_KV_BYTES = 2 * 30 * 3 * 64 * 4
GB = 10**9

TOPICS = [
    "a lighthouse keeper", "a robot learning to paint", "the first winter in a mountain village", "a lost cat in Paris",
    "two rival bakers", "a ship caught in a storm", "a library that never closes", "a dragon who is afraid of fire",
    "a clockmaker's apprentice", "a desert caravan", "a child who talks to trees", "an old radio that plays tomorrow",
    "a city under the sea", "a tired detective", "a garden on the moon", "a musician who lost her voice",
]
FILLER = [
    "Describe the place, the people and what happens, in detail.",
    "Give every character a name and a reason to be there.",
    "Let the weather change as the story goes on.",
    "End with a surprise that makes sense when you look back.",
    "Write it in the past tense, with plenty of dialogue.",
]
PARAGRAPHS = [
    ("The harbour town woke slowly. Fishermen checked their nets while the baker opened the shutters, and the "
     "smell of fresh bread drifted down to the quay, where gulls argued over scraps left from the night before."),
    ("At the council meeting the mayor read out the accounts: the new sea wall had cost twice what was planned, "
     "the school roof still leaked, and the ferry company wanted a longer lease on the western pier."),
    ("Maria, who kept the lighthouse, wrote in her log that the fog had come in earlier than usual and that a "
     "small boat without lights had crossed the bay twice after midnight, heading north each time."),
    ("In the market the talk was of the storm season. Old Tomas said the swallows had left a week early, which "
     "meant a hard autumn, and nobody argued, because Tomas had been right about the weather for forty years."),
    ("The ferry from the mainland brought three strangers: a surveyor with a brass tripod, a young woman "
     "carrying a cello case, and a quiet man who asked at the inn whether anyone still rented rooms by the month."),
    ("By evening the wind had turned. Shutters banged along the high street, the harbour master doubled the "
     "lines on the larger boats, and the children were called in early from the beach."),
    ("Later, when the lamps were lit, the surveyor spread his maps across a table at the inn and traced the "
     "line of the old coastal road with his finger, stopping at the point where it vanished into the cliffs."),
]


@dataclass
class StreamResult:
    times: list[float] = field(default_factory=list)  # arrival of each event carrying text
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    sent: float = 0.0
    ended: float = 0.0

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]

    def gaps_overlapping(self, start: float, end: float) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:]) if b > start and a < end]

    @property
    def offsets(self) -> list[int]:
        """Each event's position in the stream: characters of text up to its end. Gap ``i`` (from
        event ``i`` to ``i + 1``) lies between ``offsets[i]`` and ``offsets[i + 1]``."""
        return list(itertools.accumulate(len(piece) for piece in self.text))

    def events_overlapping(self, start: float, end: float) -> tuple[int, int] | None:
        """Indices of the first and last event that bound the gaps overlapping ``start``..``end``."""
        inside = [i for i, (a, b) in enumerate(zip(self.times, self.times[1:])) if b > start and a < end]
        return (inside[0], inside[-1] + 1) if inside else None

    def gaps_between(self, low: int, high: int) -> list[float]:
        """Gaps whose two events lie at text positions ``low``..``high`` (both included)."""
        at = self.offsets
        return [self.times[i + 1] - self.times[i] for i in range(len(self.times) - 1)
                if at[i] >= low and at[i + 1] <= high]

    def time_between(self, low: int, high: int) -> float:
        """Seconds from the first event at text position ``low`` or later to the last at ``high`` or
        earlier (NaN if none)."""
        at = [t for t, offset in zip(self.times, self.offsets) if low <= offset <= high]
        return at[-1] - at[0] if at else float("nan")


@dataclass
class Phase:
    name: str
    started: float
    ended: float
    streams: list[StreamResult]
    tokens: int
    long: StreamResult | None = None
    window: tuple[float, float] | None = None  # (c): long request sent .. its first token
    others_cpu: float = float("nan")  # share of the machine's CPU that neither server nor bench used

    @property
    def wall(self) -> float:
        return max(s.ended for s in self.streams) - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall


class Client:
    """Streams seed /chat requests and reads each SSE event as it arrives."""

    def __init__(self, url: str, connections: int) -> None:
        self.url = url
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits)

    async def close(self) -> None:
        await self.http.aclose()

    async def prompt_tokens(self, messages: list[dict]) -> int:
        response = await self.http.post(f"{self.url}/v1/tokenize", json={"messages": messages})
        response.raise_for_status()
        return response.json()["count"]

    async def text_tokens(self, text: str) -> int:
        response = await self.http.post(f"{self.url}/v1/tokenize", json={"prompt": text})
        response.raise_for_status()
        return response.json()["count"]

    async def stream(self, messages: list[dict], max_tokens: int, result: StreamResult,
                     stop: asyncio.Event | None = None, stop_after: list[float] | None = None,
                     on_token=None) -> StreamResult:
        """Fill ``result`` as events come; with ``stop``: leave (the server aborts the row) at the
        first token after ``stop`` is set and later than ``stop_after[0]``."""
        body = {"messages": messages, "stream": True, "chunk": True, "max_tokens": max_tokens,
                "temperature": 0, "repetition_penalty": 1.0}
        result.sent = time.perf_counter()
        async with self.http.stream("POST", f"{self.url}/chat", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"/chat answered {response.status_code}: {(await response.aread())[:300]!r}")
            async for event in sse_events(response):
                now = time.perf_counter()
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        result.times.append(now)
                        result.text.append(piece)
                        if on_token is not None:
                            on_token(result)
                    result.finish = choice.get("finish_reason") or result.finish
                if stop is not None and stop.is_set() and result.times and result.times[-1] > stop_after[0]:
                    result.finish = "left"
                    break
        result.ended = time.perf_counter()
        return result

    async def tokens_of(self, result: StreamResult, max_tokens: int) -> int:
        """Tokens generated: max_tokens when cut by it, else the text's tokens (+1 for a stop token)."""
        if result.finish == "length":
            return max_tokens
        return await self.text_tokens("".join(result.text)) + (1 if result.finish == "stop" else 0)


# --- prompts -------------------------------------------------------------------------------


async def short_prompts(client: Client, count: int, tag: str, target: int) -> list[list[dict]]:
    """``count`` story requests of about ``target`` prompt tokens each (template included); ``tag``
    makes them differ from other phases' right after the system prompt, so no prefix-cache hit."""
    out = []
    for i in range(count):
        content = f"Story {tag}-{i}: write a long story about {TOPICS[i % len(TOPICS)]}."
        extra = 0
        messages = [{"role": "user", "content": content}]
        while await client.prompt_tokens(messages) < target and extra < 4 * len(FILLER):
            content += " " + FILLER[(i + extra) % len(FILLER)]
            extra += 1
            messages = [{"role": "user", "content": content}]
        out.append(messages)
    return out


def _conversation(tag: str, paragraphs: int) -> list[dict]:
    """A multi-turn conversation: the user pastes a document in parts, the assistant acknowledges
    each, then the user asks for a summary."""
    parts = [f"Part {n + 1}. {PARAGRAPHS[n % len(PARAGRAPHS)]}" for n in range(paragraphs)]
    messages: list[dict] = []
    per_turn = 12
    for start in range(0, len(parts), per_turn):
        head = f"Document {tag}, continued.\n\n" if start else f"Document {tag}: notes from a harbour town.\n\n"
        messages.append({"role": "user", "content": head + "\n\n".join(parts[start:start + per_turn])})
        messages.append({"role": "assistant", "content": "Noted. Please go on."})
    messages.append({"role": "user", "content": "That is the whole document. Summarise it in one paragraph."})
    return messages


async def long_conversation(client: Client, tag: str, target: int) -> tuple[list[dict], int]:
    """The largest conversation of whole paragraphs whose prompt is at most ``target`` tokens."""
    one = await client.prompt_tokens(_conversation(tag, len(PARAGRAPHS)))
    low, high = 1, max(2, int(target / max(1, one) * len(PARAGRAPHS) * 1.5))
    while low < high:  # largest count of paragraphs with prompt tokens <= target
        mid = (low + high + 1) // 2
        if await client.prompt_tokens(_conversation(tag, mid)) <= target:
            low = mid
        else:
            high = mid - 1
    messages = _conversation(tag, low)
    return messages, await client.prompt_tokens(messages)


# --- server memory and KV metrics ---------------------------------------------------------


class Sampler:
    """RSS of the server (and its children) every ``interval`` s; /metrics KV blocks every 1 s."""

    def __init__(self, pid: int | None, url: str, interval: float = 0.1) -> None:
        self.process = psutil.Process(pid) if pid else None
        self.url, self.interval = url, interval
        self.rss: list[tuple[float, int]] = []
        self.kv_used: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def rss_now(self) -> int | None:
        if self.process is None:
            return None
        try:
            return sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
        except psutil.Error:
            return None

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            tick = 0
            while not self._stop.is_set():
                rss = self.rss_now()
                if rss is not None:
                    self.rss.append((time.perf_counter(), rss))
                if tick % max(1, round(1 / self.interval)) == 0:
                    used = kv_metrics(http, self.url).get("used")
                    if used is not None:
                        self.kv_used.append((time.perf_counter(), used))
                tick += 1
                self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, series: list[tuple[float, float]], start: float, end: float) -> float | None:
        inside = [v for t, v in series if start <= t <= end]
        return max(inside) if inside else None

    def before(self, series: list[tuple[float, float]], moment: float) -> float | None:
        earlier = [v for t, v in series if t <= moment]
        return earlier[-1] if earlier else None


def kv_metrics(http: httpx.Client, url: str) -> dict[str, float]:
    """glm_api_chat_kv_blocks by state, "preemptions" (glm_api_chat_preemptions_total), and the
    engine's step count: "steps", "steps<=0.75", "steps<=1.0" (glm_api_chat_step_seconds)."""
    try:
        text = http.get(f"{url}/metrics").text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("glm_api_chat_kv_blocks{"):
            state = line.split('state="', 1)[1].split('"', 1)[0]
            out[state] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("glm_api_chat_preemptions_total"):
            out["preemptions"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("glm_api_chat_step_seconds_count"):
            out["steps"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("glm_api_chat_step_seconds_bucket") and ('le="0.75"' in line or 'le="1.0"' in line):
            out["steps<=" + line.split('le="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def long_steps(before: dict[str, float], after: dict[str, float]) -> str:
    """Engine steps between two scrapes that took over 0.75 s and over 1 s (a client's long gap
    is one of these, or time spent outside the engine)."""
    if "steps" not in after:
        return "engine step times not in /metrics"
    moved = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in ("steps", "steps<=0.75", "steps<=1.0")}
    return (f"engine steps over 0.75 s: {moved['steps'] - moved['steps<=0.75']:.0f}, over 1 s: "
            f"{moved['steps'] - moved['steps<=1.0']:.0f} of {moved['steps']:.0f}")


class CpuMeter:
    """How much of the machine's CPU went to processes other than the server and this bench:
    on a shared 2-core machine a figure taken while someone else compiles is not the server's."""

    def __init__(self, pid: int | None) -> None:
        self.server = psutil.Process(pid) if pid else None
        self.me = psutil.Process()

    def snapshot(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        ours = _cpu(self.me)
        if self.server is not None:
            try:
                ours += _cpu(self.server) + sum(_cpu(c) for c in self.server.children(recursive=True))
            except psutil.Error:
                pass
        return time.perf_counter(), busy, ours

    def others_share(self, since: tuple[float, float, float]) -> float:
        """Others' CPU seconds over (wall seconds x CPUs) since ``since``; NaN without the server's pid."""
        if self.server is None:
            return float("nan")
        now = self.snapshot()
        wall = now[0] - since[0]
        return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / (wall * (psutil.cpu_count() or 1))


def _cpu(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


def find_server_pid(url: str) -> int | None:
    """The process listening on ``url``'s port on this machine, if it can be seen."""
    port = httpx.URL(url).port
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    except psutil.Error:
        pass
    return None


def kv_bytes_per_token(args) -> tuple[int, str]:
    """From the served model's config.json (the converted folder for a GGUF) via the engine's own
    config arithmetic (glm_api.kv_memory.layer_cache_bytes); else SmolLM2-135M's float32 figure."""
    if args.kv_bytes_per_token:
        return args.kv_bytes_per_token, "--kv-bytes-per-token"
    try:
        import torch
        from transformers import AutoConfig

        from glm_api.config import Settings
        from glm_api.kv_memory import layer_cache_bytes
        from glm_api.families.detect import _gguf_file
        from glm_api.families.transformers_lm import gguf_cache_folder
        from glm_api.registry import resolve_model_sources

        overrides = {"cache_dir": args.cache_dir}
        if args.chat_model:
            overrides["chat_model"] = args.chat_model
        settings = Settings(**overrides)
        path = resolve_model_sources(settings).chat.path
        gguf = _gguf_file(path)
        folder = gguf_cache_folder(gguf, settings.cache_dir) if gguf else path
        config = AutoConfig.from_pretrained(folder)
        dtype = getattr(torch, args.dtype)
        return sum(layer_cache_bytes(config, dtype)), f"{folder.name}/config.json, {args.dtype}"
    except (ImportError, OSError, ValueError, AttributeError, TypeError) as exc:  # fall back to the documented figure
        return SMOLLM2_FP32_KV_BYTES, f"SmolLM2-135M fp32 constant ({type(exc).__name__}: {exc})"


# --- phases --------------------------------------------------------------------------------


async def short_phase(client: Client, name: str, prompts: list[list[dict]], max_tokens: int,
                      long_messages: list[dict] | None, long_max_tokens: int) -> Phase:
    """All short streams (and the long conversation, if given) sent at once."""
    results = [StreamResult() for _ in prompts]
    long = StreamResult() if long_messages else None
    started = time.perf_counter()
    tasks = [asyncio.create_task(client.stream(m, max_tokens, r)) for m, r in zip(prompts, results)]
    long_task = asyncio.create_task(client.stream(long_messages, long_max_tokens, long)) if long else None
    await asyncio.gather(*tasks)
    shorts_done = time.perf_counter()
    if long_task is not None:
        await long_task
    tokens = sum([await client.tokens_of(r, max_tokens) for r in results])
    return Phase(name, started, max(shorts_done, long.ended if long else 0.0), results, tokens, long)


async def late_phase(client: Client, name: str, prompts: list[list[dict]], max_tokens: int,
                     long_messages: list[dict], long_max_tokens: int, delay: float) -> Phase:
    """The long conversation alone, then (after ``delay`` seconds; none with no prompts) the short
    streams, while it is still prefilling. The phase's clock starts when the shorts are sent."""
    long = StreamResult()
    long_task = asyncio.create_task(client.stream(long_messages, long_max_tokens, long))
    if not prompts:
        await long_task
        return Phase(name, long.sent, long.ended, [long], await client.tokens_of(long, long_max_tokens), long)
    await asyncio.sleep(delay)
    if long.times:
        print(f"warning: {name}: the long prompt's first token came before the short requests were sent")
    results = [StreamResult() for _ in prompts]
    started = time.perf_counter()
    await asyncio.gather(*[client.stream(m, max_tokens, r) for m, r in zip(prompts, results)])
    shorts_done = time.perf_counter()
    await long_task
    tokens = sum([await client.tokens_of(r, max_tokens) for r in results])
    return Phase(name, started, max(shorts_done, long.ended), results, tokens, long)


def ttft_p50(phase: Phase) -> float:
    return percentile([r.times[0] - r.sent for r in phase.streams if r.times], 50)


def long_ttft(phase: Phase) -> float:
    return phase.long.times[0] - phase.long.sent if phase.long and phase.long.times else float("nan")


async def late_phases(client: Client, meter: "CpuMeter", args, long_alone: list[dict], long_late: list[dict],
                      prompts: list[list[dict]]) -> tuple[Phase, Phase]:
    """(e0) and (e): a long conversation alone, then another with short requests arriving late."""
    since = meter.snapshot()
    e0 = await late_phase(client, "(e0) long alone", [], 0, long_alone, args.long_max_tokens, 0)
    e0.others_cpu = meter.others_share(since)
    print(f"  {e0.name}: TTFT {long_ttft(e0):.1f} s{_busy(e0)}", flush=True)
    await asyncio.sleep(0.5)
    since = meter.snapshot()
    e = await late_phase(client, "(e) long, then short", prompts, args.short_max_tokens, long_late,
                         args.long_max_tokens, args.late_delay)
    e.others_cpu = meter.others_share(since)
    print(f"  {e.name}: shorts' TTFT p50 {ttft_p50(e):.2f} s, {e.tokens_per_s:.1f} tok/s; long TTFT "
          f"{long_ttft(e):.1f} s{_busy(e)}", flush=True)
    return e0, e


def late_rows(a: Phase, e0: Phase, e: Phase, a2: Phase | None = None) -> list[list]:
    """With ``a2`` (the short streams alone again after (e)), the baseline is the mean of the two:
    on a shared machine one 12 s phase alone moved by up to 0.2x between runs."""
    alone = [p for p in (a, a2) if p is not None]
    ttft_alone = statistics.fmean(ttft_p50(p) for p in alone)
    speed_alone = statistics.fmean(p.tokens_per_s for p in alone)
    ttft_ratio, speed_ratio, long_ratio = ttft_p50(e) / ttft_alone, e.tokens_per_s / speed_alone, long_ttft(e) / long_ttft(e0)
    rows = [["(a) short streams alone, TTFT p50 s", ttft_p50(a), "baseline", ""]]
    if a2 is not None:
        rows.append(["(a2) the same after (e), TTFT p50 s", ttft_p50(a2), "baseline", ""])
    return rows + [
        ["(e) short streams sent during a long prefill, TTFT p50 s", ttft_p50(e), "", ""],
        ["(e) / (a) TTFT p50", ttft_ratio, "<= 2.00", _verdict(ttft_ratio <= 2.0)],
        ["(e) / (a) short streams' tok/s", speed_ratio, ">= 0.80", _verdict(speed_ratio >= 0.8)],
        ["(e0) long prompt alone, TTFT s", long_ttft(e0), "baseline", ""],
        ["(e) / (e0) long prompt's TTFT", long_ratio, "<= 2.00", _verdict(long_ratio <= 2.0)],
    ]


async def measure_late(client: Client, pid: int | None, args) -> int:
    """``--late-only``: (a), (e0), (e) and (a2)."""
    short_a = await short_prompts(client, args.short_streams, "a", args.short_prompt_tokens)
    short_e = await short_prompts(client, args.short_streams, "e", args.short_prompt_tokens)
    short_a2 = await short_prompts(client, args.short_streams, "a2", args.short_prompt_tokens)
    long_e0, tokens_e0 = await long_conversation(client, "E", args.long_tokens)
    long_e, tokens_e = await long_conversation(client, "F", args.long_tokens)
    warm_long, _ = await long_conversation(client, "W", min(args.long_tokens, 700))
    await short_phase(client, "warm-up", short_a[:2], 4, warm_long, 2)
    meter = CpuMeter(pid)
    since = meter.snapshot()
    a = await short_phase(client, "(a) short alone", short_a, args.short_max_tokens, None, 0)
    a.others_cpu = meter.others_share(since)
    print(f"  {a.name}: TTFT p50 {ttft_p50(a):.2f} s, {a.tokens_per_s:.1f} tok/s{_busy(a)}", flush=True)
    e0, e = await late_phases(client, meter, args, long_e0, long_e, short_e)
    since = meter.snapshot()
    a2 = await short_phase(client, "(a2) short alone, after", short_a2, args.short_max_tokens, None, 0)
    a2.others_cpu = meter.others_share(since)
    print(f"  {a2.name}: TTFT p50 {ttft_p50(a2):.2f} s, {a2.tokens_per_s:.1f} tok/s{_busy(a2)}", flush=True)
    print()
    print(f"{machine_line()}; long prompts {tokens_e0} / {tokens_e} tokens; short: {args.short_streams} streams x "
          f"{args.short_max_tokens} tokens, sent {args.late_delay:.1f} s after the long one; server args: "
          f"{' '.join(args.server_args) or '-'}")
    print()
    rows = late_rows(a, e0, e, a2)
    print_table(["figure", "value", "goal", "result"], rows)
    busy = [p.others_cpu for p in (a, e0, e, a2) if p.others_cpu == p.others_cpu]
    if busy and max(busy) > 0.1:
        print(f"warning: other processes used up to {max(busy):.0%} of the machine's CPU during a phase")
    return 0 if all(r[3] != "FAIL" for r in rows) else 1


async def paused_phase(client: Client, name: str, prompts: list[list[dict]], max_tokens: int, settle: int,
                       long_messages: list[dict] | None, long_max_tokens: int, alone_seconds: float) -> Phase:
    """``prompts`` decoding; once each has ``settle`` tokens, the window opens: the long
    conversation is sent (window ends at its first token) or, without one, ``alone_seconds``
    pass. Then every stream leaves at its next token."""
    results = [StreamResult() for _ in prompts]
    settled, stop, window_end = asyncio.Event(), asyncio.Event(), [float("inf")]

    def on_token(_: StreamResult) -> None:
        if all(len(r.times) >= settle for r in results):
            settled.set()

    started = time.perf_counter()
    tasks = [asyncio.create_task(client.stream(m, max_tokens, r, stop, window_end, on_token))
             for m, r in zip(prompts, results)]
    await _until(settled, tasks)
    opened = time.perf_counter()
    long = None
    if long_messages is not None:
        long = StreamResult()
        first = asyncio.Event()
        long_task = asyncio.create_task(
            client.stream(long_messages, long_max_tokens, long, on_token=lambda r: first.set()))
        await _until(first, [long_task])
        window_end[0] = long.times[0]
    else:
        await asyncio.sleep(alone_seconds)
        window_end[0] = time.perf_counter()
    stop.set()
    await asyncio.gather(*tasks)
    if long is not None:
        await long_task
    early = [r for r in results if r.finish != "left"]
    if early:
        print(f"  warning: {len(early)} of {len(results)} streams ended ({early[0].finish}) before the window "
              f"closed; raise --paused-max-tokens", flush=True)
    tokens = sum(len(r.times) for r in results)
    return Phase(name, started, time.perf_counter(), results, tokens, long, (opened, window_end[0]))


async def again_phase(client: Client, name: str, prompts: list[list[dict]], max_tokens: int,
                      until: list[int]) -> Phase:
    """``prompts`` decoding with nothing else sent, until stream ``i``'s text is ``until[i]``
    characters long (or it has ended); then every stream leaves at its next token, as in (c)."""
    results = [StreamResult() for _ in prompts]
    chars = {id(r): 0 for r in results}
    stop, stop_after = asyncio.Event(), [float("inf")]

    def check(_: object = None) -> None:
        if not stop.is_set() and all(r.finish is not None or chars[id(r)] >= u for r, u in zip(results, until)):
            stop_after[0] = time.perf_counter()
            stop.set()

    def on_token(result: StreamResult) -> None:
        chars[id(result)] += len(result.text[-1])
        check()

    started = time.perf_counter()
    tasks = [asyncio.create_task(client.stream(m, max_tokens, r, stop, stop_after, on_token))
             for m, r in zip(prompts, results)]
    for task in tasks:
        task.add_done_callback(check)  # a stream that ends short of its position must not hold the others
    await asyncio.gather(*tasks)
    short = [r for r, u in zip(results, until) if chars[id(r)] < u]
    if short:
        print(f"  warning: {len(short)} of {len(results)} streams ended ({short[0].finish}) before the position "
              f"where (c)'s window closed; their later positions have no baseline", flush=True)
    return Phase(name, started, time.perf_counter(), results, sum(len(r.times) for r in results))


async def _until(event: asyncio.Event, tasks: list[asyncio.Task]) -> None:
    """Wait for ``event``; raise if one of ``tasks`` ends first (a failed stream must not hang us)."""
    waiter = asyncio.create_task(event.wait())
    pending = {waiter, *tasks}
    while not event.is_set():
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {waiter}:
            task.result()  # raises a stream's error
        if not event.is_set() and pending == {waiter}:
            raise RuntimeError("every stream ended before the window opened")
    waiter.cancel()


def window_gaps(phase: Phase) -> list[float]:
    start, end = phase.window
    return [g for r in phase.streams for g in r.gaps_overlapping(start, end)]


def window_events(phase: Phase) -> list[tuple[int, int] | None]:
    """Per stream: the first and last event bounding its gaps that overlap the window."""
    return [r.events_overlapping(*phase.window) for r in phase.streams]


def window_positions(phase: Phase) -> list[tuple[int, int] | None]:
    """Per stream: the text positions of :func:`window_events`."""
    out = []
    for r, events in zip(phase.streams, window_events(phase)):
        out.append(None if events is None else (r.offsets[events[0]], r.offsets[events[1]]))
    return out


def context_range(phase: Phase, prompt_tokens: list[int]) -> tuple[int, int]:
    """Median context (prompt + events so far, an event being about a token) at the window's
    first and last event."""
    spans = [(p + e[0] + 1, p + e[1] + 1) for e, p in zip(window_events(phase), prompt_tokens) if e]
    if not spans:
        return 0, 0
    return round(statistics.median(a for a, _ in spans)), round(statistics.median(b for _, b in spans))


# --- the run -------------------------------------------------------------------------------


async def measure(url: str, pid: int | None, args) -> int:
    client = Client(url, connections=args.short_streams + args.paused_streams + 4)
    try:
        if args.late_only:
            return await measure_late(client, pid, args)
        return await _measure(client, url, pid, args)
    finally:
        await client.close()


async def _measure(client: Client, url: str, pid: int | None, args) -> int:
    bpt, bpt_source = kv_bytes_per_token(args)
    short_a = await short_prompts(client, args.short_streams, "a", args.short_prompt_tokens)
    short_b = await short_prompts(client, args.short_streams, "b", args.short_prompt_tokens)
    paused = [await short_prompts(client, args.paused_streams, tag, args.short_prompt_tokens) for tag in "cd"]
    long_b, long_b_tokens = await long_conversation(client, "B", args.long_tokens)
    long_c, long_c_tokens = await long_conversation(client, "C", args.long_tokens)
    long_e0, _ = await long_conversation(client, "E", args.long_tokens)
    long_e, _ = await long_conversation(client, "F", args.long_tokens)
    short_e = await short_prompts(client, args.short_streams, "e", args.short_prompt_tokens)
    warm_long, _ = await long_conversation(client, "W", min(args.long_tokens, 700))
    prompt_sizes = [await client.prompt_tokens(m) for m in short_a]
    paused_sizes = [[await client.prompt_tokens(m) for m in group] for group in paused]
    print(f"short prompts: {min(prompt_sizes)}-{max(prompt_sizes)} tokens; long conversations: {long_b_tokens} "
          f"and {long_c_tokens} prompt tokens ({len(long_b)} messages); KV {bpt} bytes/token ({bpt_source})",
          flush=True)

    # Warm up: first batches, and the chunked-prefill path of a prompt longer than one chunk.
    await short_phase(client, "warm-up", short_a[:2], 4, warm_long, 2)
    with httpx.Client(timeout=10) as http:
        metrics_start = kv_metrics(http, url)
    load_start = os.getloadavg()[0]
    meter = CpuMeter(pid)
    with Sampler(pid, url) as sampler:
        rss_idle = sampler.rss_now()
        since = meter.snapshot()
        a = await short_phase(client, "(a) short alone", short_a, args.short_max_tokens, None, 0)
        a.others_cpu = meter.others_share(since)
        print(f"  {a.name}: {a.tokens_per_s:.1f} tok/s over {a.wall:.1f} s{_busy(a)}", flush=True)
        since = meter.snapshot()
        alone = await paused_phase(client, "(c0) streams alone", paused[0], args.paused_max_tokens, args.settle_tokens,
                                   None, 0, args.alone_seconds)
        alone.others_cpu = meter.others_share(since)
        print(f"  {alone.name}: median gap {percentile(window_gaps(alone), 50) * 1000:.0f} ms{_busy(alone)}", flush=True)
        await asyncio.sleep(0.5)
        rss_before_b = sampler.rss_now()
        since = meter.snapshot()
        b = await short_phase(client, "(b) short + long", short_b, args.short_max_tokens, long_b, args.long_max_tokens)
        b.others_cpu = meter.others_share(since)
        print(f"  {b.name}: {b.tokens_per_s:.1f} tok/s over {b.wall:.1f} s (shorts); long TTFT "
              f"{b.long.times[0] - b.long.sent:.1f} s{_busy(b)}", flush=True)
        await asyncio.sleep(0.5)
        rss_before_c = sampler.rss_now()
        since = meter.snapshot()
        with httpx.Client(timeout=10) as http:
            steps_before_c = kv_metrics(http, url)
        c = await paused_phase(client, "(c) streams + long", paused[1], args.paused_max_tokens, args.settle_tokens,
                               long_c, args.long_max_tokens, 0)
        c.others_cpu = meter.others_share(since)
        with httpx.Client(timeout=10) as http:
            steps_c = long_steps(steps_before_c, kv_metrics(http, url))
        print(f"  {c.name}: window {c.window[1] - c.window[0]:.1f} s, longest gap {max(window_gaps(c)):.2f} s; "
              f"{steps_c}{_busy(c)}", flush=True)
        await asyncio.sleep(0.5)
        positions = window_positions(c)  # per (c) stream: the text positions its window's gaps lie between
        since = meter.snapshot()
        same = await again_phase(client, "(c1) same streams alone", paused[1], args.paused_max_tokens,
                                 [p[1] if p else 0 for p in positions])
        same.others_cpu = meter.others_share(since)
        gaps_same = [g for r, p in zip(same.streams, positions) if p for g in r.gaps_between(*p)]
        print(f"  {same.name}: median gap at (c)'s window's positions {percentile(gaps_same, 50) * 1000:.0f} ms"
              f"{_busy(same)}", flush=True)
        await asyncio.sleep(0.5)
        e0, e = await late_phases(client, meter, args, long_e0, long_e, short_e)
        rss_end = sampler.rss_now()
    with httpx.Client(timeout=10) as http:
        metrics_end = kv_metrics(http, url)
    load_end = os.getloadavg()[0]

    # Figures and goals.
    ratio_b = b.tokens_per_s / a.tokens_per_s
    gaps_alone, gaps_c = window_gaps(alone), window_gaps(c)
    longest = max(gaps_c) if gaps_c else float("nan")
    median_ratio = percentile(gaps_c, 50) / percentile(gaps_same, 50)
    start_ratio = percentile(gaps_c, 50) / percentile(gaps_alone, 50)
    context_c, context_alone = context_range(c, paused_sizes[1]), context_range(alone, paused_sizes[0])
    rows = [
        ["(a) short streams alone, tok/s", a.tokens_per_s, "baseline", ""],
        ["(b) short streams beside the long conversation, tok/s", b.tokens_per_s, "", ""],
        ["(b) / (a)", ratio_b, ">= 0.80", _verdict(ratio_b >= 0.8)],
        ["(c) longest gap during the long prefill, s", longest, "<= 1.00", _verdict(longest <= 1.0)],
        ["(c) median gap during the prefill, ms", percentile(gaps_c, 50) * 1000, "", ""],
        ["(c1) median gap, same streams alone at the same positions, ms", percentile(gaps_same, 50) * 1000,
         "baseline", ""],
        [f"(c) / (c1) median gap, at equal context (~{context_c[0]}-{context_c[1]} tokens)", median_ratio,
         "<= 1.30", _verdict(median_ratio <= 1.3)],
        [f"(c0) median gap, other streams alone at the start (~{context_alone[0]}-{context_alone[1]} tokens), ms",
         percentile(gaps_alone, 50) * 1000, "info", ""],
        ["(c) / (c0) median gap, vs alone at the start (context growth included)", start_ratio, "info", ""],
    ]
    long_kv = long_b_tokens * bpt
    if sampler.rss:
        peak_b = sampler.peak(sampler.rss, b.started, b.ended)
        growth_b = peak_b - rss_before_b
        limit = long_kv + 0.5 * GB
        rows += [
            ["(d) RSS growth during (b), MB", growth_b / 1e6, f"<= {limit / 1e6:.0f}", _verdict(growth_b <= limit)],
        ]
    rows += late_rows(a, e0, e)
    table_goals = rows

    # (c1)'s counterpart of a window: the longest time a stream took over its compared positions.
    same_span = max((r.time_between(*p) for r, p in zip(same.streams, positions) if p), default=float("nan"))
    details = []
    for phase, gaps, span in ((a, None, None), (b, None, None), (alone, gaps_alone, None), (c, gaps_c, None),
                              (same, gaps_same, same_span), (e, None, None)):
        if gaps is None:
            gaps = [g for r in phase.streams for g in r.gaps]
        if span is None and phase.window:
            span = phase.window[1] - phase.window[0]
        ttft = [r.times[0] - r.sent for r in phase.streams if r.times]
        details.append([
            phase.name, len(phase.streams), phase.tokens,
            phase.wall if span is None else span,
            phase.tokens_per_s if span is None else float("nan"),
            percentile(ttft, 50), percentile(gaps, 50) * 1000, percentile(gaps, 95) * 1000, max(gaps, default=float("nan")),
            (phase.long.times[0] - phase.long.sent) if phase.long else float("nan"),
            (phase.long.ended - phase.long.sent) if phase.long else float("nan"),
            f"{phase.others_cpu:.0%}" if phase.others_cpu == phase.others_cpu else "-",
        ])

    print()
    print(f"{machine_line()}; load average {load_start:.2f} at start, {load_end:.2f} at end")
    print(f"short: {args.short_streams} streams x {args.short_max_tokens} tokens, prompts {min(prompt_sizes)}-"
          f"{max(prompt_sizes)} tokens; paused: {args.paused_streams} streams; long: {long_b_tokens} / {long_c_tokens} "
          f"prompt tokens + {args.long_max_tokens} generated; greedy; server args: {' '.join(args.server_args) or '-'}")
    print()
    print_table(["figure", "value", "goal", "result"], table_goals)
    print()
    print("Phases (for (c0) and (c): the window and the gaps overlapping it; for (c1): the gaps at the text positions "
          "of (c)'s, and the longest time a stream took over them):")
    print_table(["phase", "streams", "tokens", "wall / window s", "tok/s", "TTFT p50 s", "gap p50 ms", "gap p95 ms",
                 "max gap s", "long TTFT s", "long total s", "others' CPU"], details)
    busy = [p.others_cpu for p in (a, b, alone, c, same, e0, e) if p.others_cpu == p.others_cpu]
    if busy and max(busy) > 0.1:
        print(f"warning: other processes used up to {max(busy):.0%} of the machine's CPU during a phase: "
              "the figures above are not the server's alone")
    print()
    events_c = [e for e in window_events(c) if e]
    same_text = sum(1 for x, y, p in zip(c.streams, same.streams, positions)
                    if p and "".join(y.text)[:p[1]] == "".join(x.text)[:p[1]])
    covered = sum(1 for y, p in zip(same.streams, positions) if p and sum(map(len, y.text)) >= p[1])
    info = [
        ["(c) events in the window per stream (first-last, median)",
         f"{statistics.median(e[0] for e in events_c):.0f}-{statistics.median(e[1] for e in events_c):.0f}"
         if events_c else "-"],
        ["(c1) streams past (c)'s window's last position / text as in (c) up to it",
         f"{covered}/{len(positions)} / {same_text}/{len(positions)}"],
        ["gaps compared: (c) / (c1)", f"{len(gaps_c)} / {len(gaps_same)}"],
    ]
    if sampler.rss:
        def mb(value: float | None) -> float:
            return float("nan") if value is None else value / 1e6

        peak_c = sampler.peak(sampler.rss, c.started, c.ended)
        info += [
            ["server RSS idle (before (a)), MB", mb(rss_idle)],
            ["RSS before (b) / peak in (b), MB", f"{mb(rss_before_b):.0f} / {mb(peak_b):.0f}"],
            ["RSS before (c) / peak in (c), MB", f"{mb(rss_before_c):.0f} / {mb(peak_c):.0f}"],
            ["RSS at end, MB", mb(rss_end)],
            ["RSS peak over the run - idle, MB", mb(max(v for _, v in sampler.rss) - rss_idle)],
        ]
    else:
        info.append(["server RSS", "not measured (no --pid, process not found)"])
    info.append(["long conversation's KV ((b) prompt tokens x bytes/token), MB", long_kv / 1e6])
    if sampler.kv_used:
        for phase in (b, c):
            used = sampler.peak(sampler.kv_used, phase.started, phase.ended)
            if used is not None:
                info.append([f"peak KV blocks used in {phase.name[:3]}", f"{used:.0f}"])
    if "preemptions" in metrics_end:
        info.append(["preemptions during the run", f"{metrics_end['preemptions'] - metrics_start.get('preemptions', 0):.0f}"])
    print_table(["detail", "value"], info)
    return 0 if all(r[3] != "FAIL" for r in table_goals) else 1


def _busy(phase: Phase) -> str:
    return f" (others used {phase.others_cpu:.0%} of the CPU)" if phase.others_cpu == phase.others_cpu else ""


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Unknown arguments are passed to the started server (e.g. --prefill-chunk-tokens 256).")
    p.add_argument("--url", help="a running server (default: start `python api.py` on a free port)")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, for RSS (default: the port's listener)")
    p.add_argument("--dtype", default="float32", help="the started server's --dtype (and the KV bytes/token)")
    p.add_argument("--chat-model", help="model path for the started server (default: the packaged SmolLM2)")
    p.add_argument("--cache-dir", default=str(Path(".cache/glm-api").resolve()))
    p.add_argument("--short-streams", type=int, default=16)
    p.add_argument("--short-prompt-tokens", type=int, default=64, help="prompt tokens of each short stream (about)")
    p.add_argument("--short-max-tokens", type=int, default=64)
    p.add_argument("--long-tokens", type=int, default=6800, help="prompt tokens of the long conversation (at most)")
    p.add_argument("--long-max-tokens", type=int, default=32)
    p.add_argument("--paused-streams", type=int, default=8)
    p.add_argument("--paused-max-tokens", type=int, default=4096,
                   help="max_tokens of the (c) streams: enough to outlast the prefill (they leave after it)")
    p.add_argument("--settle-tokens", type=int, default=4, help="tokens each (c) stream has before the window opens")
    p.add_argument("--alone-seconds", type=float, default=6.0, help="window of the (c0) baseline")
    p.add_argument("--late-delay", type=float, default=2.0, help="(e): seconds between the long prompt and the shorts")
    p.add_argument("--late-only", action="store_true", help="run only (a), (e0) and (e)")
    p.add_argument("--kv-bytes-per-token", type=int,
                   help="KV bytes per token of the served model (default: from its config.json)")
    args, server_args = p.parse_known_args()
    args.server_args = server_args

    if args.url:
        pid = args.pid or find_server_pid(args.url)
        return asyncio.run(measure(args.url.rstrip("/"), pid, args))
    command = ["--dtype", args.dtype, "--cache-dir", args.cache_dir, "--log-level", "warning", *server_args]
    if args.chat_model:
        command += ["--chat-model", args.chat_model]
    with running_server(glm_api_command(command), ready_path="/ready", log_name="glm-api-long-context") as server:
        print(f"server {server.url} (pid {server.process.pid}, log {server.log_path})", flush=True)
        return asyncio.run(measure(server.url, server.process.pid, args))


if __name__ == "__main__":
    sys.exit(main())
