"""Output of one chat-engine worker turn, handed to each event loop in a single thread hop."""

from __future__ import annotations

import asyncio
from typing import Protocol

from glm_api.engines.base import GenerationChunk

Item = GenerationChunk | BaseException


class Recipient(Protocol):
    loop: asyncio.AbstractEventLoop  # the event loop the request's consumer runs on
    queue: asyncio.Queue  # where its consumer waits for items


def _deliver(items: list[tuple[asyncio.Queue, Item]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class Outbox:
    """Collects items from the worker thread; ``flush`` sends one ``call_soon_threadsafe`` per
    event loop rather than one per item."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Item]]] = {}

    def put(self, to: Recipient, item: Item) -> None:
        self._by_loop.setdefault(to.loop, []).append((to.queue, item))

    def flush(self) -> None:
        for loop, items in self._by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass
        self._by_loop = {}
