"""The worker-thread lifecycle both engines share: start, stop, health."""

from __future__ import annotations

import threading

from glm_api.errors import EngineUnavailableError


class EngineThread:
    """Owns one daemon thread running ``self._loop``; subclasses set ``self._dead`` with the
    reason when the loop dies, and wait on ``self._cv`` for work or ``self._stopping``."""

    _kind = "engine"  # for messages: "chat engine", "embedding engine"

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: str | None = None

    def _loop(self) -> None:  # pragma: no cover - each engine defines its own
        raise NotImplementedError

    def start(self) -> None:
        """Start the worker thread; a second start while it runs does nothing (two threads over
        one engine would both schedule and step the same sequences)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"{self._kind}-{self.model_name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineUnavailableError(f"{self._kind} {self.model_name} stopped: {self._dead}")
        if self._stopping or self._thread is None or not self._thread.is_alive():
            raise EngineUnavailableError(f"{self._kind} {self.model_name} is not running")
