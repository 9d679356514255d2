"""When the batch runner lets a chat line start: its policy over the chat engine's public counts
(``num_running``, ``num_waiting``), read through a stand-in registry that holds only those."""

from __future__ import annotations

from types import SimpleNamespace

from glm_api.batch_runner import BatchRunner


def _runner(max_running: int = 8, share: int = 2):
    chat = SimpleNamespace(num_running=0, num_waiting=0)
    services = SimpleNamespace(registry=SimpleNamespace(chat=chat))
    runner = BatchRunner(storage=None, services=lambda: services, max_running=max_running, share=share)
    return runner, chat


def _start_lines(runner: BatchRunner, chat, slots: int) -> int:
    """Start chat lines while the runner allows (at most 100); the engine runs the first
    ``slots`` and queues the rest."""
    started = 0
    while started < 100 and runner._may_start(is_chat=True):
        runner._count(True, +1)
        started += 1
        chat.num_running, chat.num_waiting = min(started, slots), max(0, started - slots)
    return started


def test_alone_the_lines_fill_the_slots_and_keep_a_quarter_more_queued():
    runner, chat = _runner(max_running=8)
    assert _start_lines(runner, chat, slots=8) == 8 + 2  # a freed slot is taken in the next step


def test_beside_interactive_requests_the_lines_keep_their_share_and_never_queue():
    runner, chat = _runner(max_running=8, share=2)
    chat.num_running = 3  # interactive requests running
    started = 0
    while started < 100 and runner._may_start(is_chat=True):
        runner._count(True, +1)
        started += 1
        chat.num_running += 1
    assert started == 2
    runner._count(True, -1)
    chat.num_running -= 1
    chat.num_waiting = 1  # an interactive request waits: no line starts, and the lines yield
    assert not runner._may_start(is_chat=True)
    runner._count(True, +2)
    assert runner._should_yield()
