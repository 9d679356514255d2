"""Start-up kernel timings kept between starts, under ``--cache-dir`` (issue 24, item 3).

Which kernel serves a projection shape is decided by timing the candidates at start-up
(:mod:`dense_kernels`, :mod:`quant_kernels`, the fused decode projections). On the 2-core dev CPU
that took ~4 s for SmolLM2's dense kernels and ~3 s for its fused projections, at every start
and for every replica. The figures depend on the machine, not on the run, so a
:class:`TimingStore` keeps them in one SQLite file (WAL) and a later start on the same machine
reuses them: the choices are then the same as the first start's, made in milliseconds.

Figures are keyed by the machine as torch sees it (CPU model and instruction-set flags, usable
CPUs, torch's intra-op threads, torch's version, :data:`METHOD`; a GPU's name for CUDA timings)
and by what was timed (the caller's kind and key: shapes, dtype, widths). Another machine, torch,
thread count or timing method times afresh. A timing taken while a neighbour loaded the machine
stays until it is taken again: ``--kernel-timings fresh`` times at every start (storing the new
figures). A store that cannot be read or written (a read-only cache folder) is skipped with a
warning: timings are then taken as without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
import torch

log = logging.getLogger(__name__)

FILE_NAME = "kernel-timings.sqlite3"
#: Changed whenever what a timing measures changes (candidates, widths' meaning, the timing
#: rule), so that figures taken the old way are not reused.
METHOD = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS timings (
    machine TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, figures TEXT NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (machine, kind, key)
)
"""


def machine_key(device: torch.device | None = None) -> str:
    """What a timing on ``device`` (default: the CPU) depends on, as one string."""
    cpu_model, flags = _cpu_identity()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 0
    parts = [platform.machine(), cpu_model, hashlib.sha256(flags.encode()).hexdigest()[:12], f"cpus={cpus}",
             f"threads={torch.get_num_threads()}", f"torch={torch.__version__}", f"method={METHOD}"]
    if device is not None and device.type == "cuda":
        parts.append(f"gpu={torch.cuda.get_device_name(device)}")
    return "|".join(parts)


def _cpu_identity() -> tuple[str, str]:
    """The CPU's model name and instruction-set flags (Linux), else what ``platform`` says."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "Processor") and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = value.strip()
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor(), flags


#: Figures as the timings give them: candidate -> rows -> milliseconds.
Figures = dict[str, dict[int, float]]


def timed(store: TimingStore | None, kind: str, key: str, measure: Callable[[], Figures],
          device: torch.device | None = None) -> tuple[Figures, bool]:
    """``measure()``'s figures, or the ones ``store`` keeps for them (None: no store). Returns
    (figures, whether stored ones were reused)."""
    if store is None:
        return measure(), False
    return store.figures(kind, key, measure, device)


class TimingStore:
    """Figures by (machine, kind, key) in the SQLite file ``path``. ``fresh``: never reuse
    stored figures (time again and store). Blocking: used while a model loads."""

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        self.path = Path(path)
        self.fresh = fresh
        self.usable = True  # False after a failure: later calls time without the store

    def figures(self, kind: str, key: str, measure: Callable[[], Figures],
                device: torch.device | None = None) -> tuple[Figures, bool]:
        """The figures stored for ``kind``/``key`` on this machine, else ``measure()``'s (stored
        for next time). Returns (figures, whether stored ones were reused)."""
        machine = machine_key(device)
        if not self.fresh:
            stored = self._read(machine, kind, key)
            if stored is not None:
                return stored, True
        value = measure()
        self._write(machine, kind, key, value)
        return value, False

    def _read(self, machine: str, kind: str, key: str) -> Figures | None:
        rows = self._run(
            "SELECT figures FROM timings WHERE machine = ? AND kind = ? AND key = ?", (machine, kind, key)
        )
        if not rows:
            return None
        try:  # JSON keys are strings: the widths come back as ints
            stored = json.loads(rows[0][0])
            return {name: {int(w): float(ms) for w, ms in by_width.items()} for name, by_width in stored.items()}
        except (ValueError, TypeError, AttributeError):  # not figures (an edited file): time again
            return None

    def _write(self, machine: str, kind: str, key: str, value: Figures) -> None:
        self._run(
            "INSERT OR REPLACE INTO timings (machine, kind, key, figures, measured_at) VALUES (?, ?, ?, ?, ?)",
            (machine, kind, key, json.dumps(value), time.time()),
        )

    def _run(self, sql: str, args: tuple) -> list[tuple]:
        if not self.usable:
            return []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One short-lived connection per call: replicas load in their own threads.
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        except (sqlite3.Error, OSError) as exc:
            self.usable = False
            log.warning("kernel timings are not kept between starts (%s: %s)", self.path, exc)
            return []
