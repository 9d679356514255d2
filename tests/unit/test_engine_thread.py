"""An engine's worker thread: starting it twice must not make two threads step one engine."""

from __future__ import annotations

import threading

from glm_api.engines.engine_thread import EngineThread


class _Idle(EngineThread):
    _kind = "test engine"

    def __init__(self) -> None:
        super().__init__("idle")
        self.loops = 0

    def _loop(self) -> None:
        with self._cv:
            self.loops += 1
            while not self._stopping:
                self._cv.wait()


def test_a_second_start_while_running_starts_no_second_thread():
    engine = _Idle()
    before = threading.active_count()
    engine.start()
    engine.start()  # e.g. two apps' lifespans over one registry
    try:
        assert threading.active_count() == before + 1
        engine.check_health()
    finally:
        engine.stop()
    assert engine.loops == 1
    engine.start()  # once stopped, it can start again
    engine.stop()
    assert engine.loops == 2
