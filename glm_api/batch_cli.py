"""``python -m glm_api batch INPUT.jsonl -o OUTPUT.jsonl [--resume]``: a batch file run offline,
with the engines in this process (no server), in the Batch API's line format.

Each line names its endpoint in ``url`` (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``) and runs through the same serving calls as over HTTP. Every line's result
(answer or error) is appended to OUTPUT as it finishes, so ``--resume`` after an interruption
runs only the lines OUTPUT does not have yet (known by ``custom_id``). The exit status is 1
when any line failed, with a summary on stderr; the model flags are the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from glm_api.cli import build_parser
from glm_api.config import Settings
from glm_api.errors import APIError, InternalError
from glm_api.registry import StartupError, build_registry, resolve_model_sources
from glm_api.serving.batch_lines import ParsedLine, RetryLater, error_line, execute, output_line, parse_lines
from glm_api.state import Services

log = logging.getLogger("glm_api.batch")


def build_batch_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "python -m glm_api batch"
    p.description = (
        "Run a batch file (OpenAI Batch API lines) with the models in this process; the model flags "
        "are the server's (and GLM_API_* variables)."
    )
    p.add_argument("input", metavar="INPUT.jsonl", type=Path, help="one request a line: custom_id, method, url, body")
    p.add_argument("-o", "--output", metavar="OUTPUT.jsonl", type=Path, required=True,
                   help="results, one a line, in the order they finish")
    p.add_argument("--resume", action="store_true", help="keep OUTPUT's results and run only the lines it lacks")
    return p


def finished_lines(output: Path) -> tuple[set[str], set[int], int]:
    """(custom_ids, line numbers of id-less error lines, failed count) in OUTPUT; a last line a
    kill cut short is dropped from the file so that it runs again."""
    ids: set[str] = set()
    numbers: set[int] = set()
    failed = 0
    kept: list[str] = []
    for text in output.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue  # only the last line can be partial; it is rewritten below
        kept.append(text)
        if row.get("custom_id") is not None:
            ids.add(row["custom_id"])
        elif (row.get("error") or {}).get("line") is not None:
            numbers.add(row["error"]["line"])
        failed += row.get("error") is not None
    output.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return ids, numbers, failed


class OutputFile:
    """Appends result lines, one writer at a time, each flushed and synced before it counts."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")
        self._lock = asyncio.Lock()

    def _append(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def append(self, row: dict) -> None:
        async with self._lock:
            await asyncio.to_thread(self._append, json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.close()


async def run_lines(services: Services, lines: list[ParsedLine], out: OutputFile, concurrency: int, bar: tqdm) -> int:
    """Run the lines, ``concurrency`` at a time; the number that failed."""
    slots = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(p: ParsedLine) -> None:
        nonlocal failed
        async with slots:
            request_id = f"batch-{p.line}"
            if p.error is not None:
                row = error_line(p.line, p.custom_id, p.error)
            else:
                while True:
                    try:
                        body = await execute(services, p.request["url"], p.request["body"], request_id)
                        row = output_line(p.custom_id, request_id, body)
                    except RetryLater:
                        await asyncio.sleep(0.5)
                        continue
                    except APIError as exc:
                        row = error_line(p.line, p.custom_id, exc, request_id)
                    except Exception:  # a bug, not the line's fault: say so, run the rest
                        log.exception("line %d", p.line)
                        row = error_line(p.line, p.custom_id, InternalError("internal error"), request_id)
                    break
            await out.append(row)
            failed += row["error"] is not None
            bar.update(1)
            bar.set_postfix(failed=failed, refresh=False)

    await asyncio.gather(*(one(p) for p in lines))
    return failed


def main(argv: list[str] | None = None) -> int:
    args = build_batch_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if v is not None and k not in ("input", "output", "resume")}
    try:
        settings = Settings(**options)
    except ValidationError as exc:
        print(f"glm-api batch: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.input.is_file():
        print(f"glm-api batch: {args.input} does not exist", file=sys.stderr)
        return 2
    if args.output.exists() and args.output.stat().st_size > 0 and not args.resume:
        print(f"glm-api batch: {args.output} exists; pass --resume to continue it, or remove it", file=sys.stderr)
        return 2
    try:
        lines = parse_lines(args.input.read_bytes(), None)
    except UnicodeDecodeError:
        print(f"glm-api batch: {args.input} is not UTF-8 text", file=sys.stderr)
        return 2
    done_ids, done_numbers, failed_before = finished_lines(args.output) if args.output.exists() else (set(), set(), 0)
    todo = [p for p in lines if not (p.custom_id in done_ids if p.custom_id is not None else p.line in done_numbers)]
    try:
        registry = build_registry(settings, resolve_model_sources(settings))
    except StartupError as exc:
        print(f"glm-api batch: cannot start: {exc}", file=sys.stderr)
        return 1
    registry.start()
    out = OutputFile(args.output)
    try:
        services = Services.build(registry, settings)
        with tqdm(total=len(lines), initial=len(lines) - len(todo), unit="line", desc="batch", dynamic_ncols=True) as bar:
            failed_now = asyncio.run(run_lines(services, todo, out, settings.max_running, bar))
    finally:
        out.close()
        registry.stop()
    failed = failed_before + failed_now
    summary = (f"{len(lines)} lines: {len(lines) - failed} completed, {failed} failed"
               f" ({len(lines) - len(todo)} from an earlier run); results in {args.output}")
    print(summary, file=sys.stderr)
    return 1 if failed else 0
