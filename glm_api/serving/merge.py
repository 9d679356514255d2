"""Interleave several async iterators, yielding items as each produces them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def merge(iterators: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of all ``iterators`` in arrival order. The first error is raised to the consumer;
    when the consumer stops (or fails), every iterator still running is cancelled."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put(item)
            await queue.put(_DONE)
        except BaseException as exc:  # hand errors (and cancellation) to the consumer
            await queue.put(exc)
            raise

    tasks = [asyncio.create_task(pump(it)) for it in iterators]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is _DONE:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
