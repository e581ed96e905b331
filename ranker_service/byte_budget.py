"""The bytes of UpsertProducts records the ranker holds at once, over all its streams (ByteBudget)."""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """Bytes of UpsertProducts records that the ranker may hold at once, over all streams, from when a
    record is read until its batch is encoded: each stream's batches are bounded too
    (`upsert_concurrency`), but 64 streams of 20 MB images would still hold gigabytes. Granted in the
    order asked; a record larger than the whole budget waits until nothing else holds any, then goes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def try_acquire(self, size: int) -> int | None:
        """`size` bytes (at most the limit) if they are free now and nobody waits, else None."""
        size = min(size, self.limit)
        if self._waiting or not self._fits(size):
            return None
        self.used += size
        return size

    async def acquire(self, size: int) -> int:
        """Wait until `size` bytes fit; returns what was granted (to release)."""
        granted = self.try_acquire(size)
        if granted is not None:
            return granted
        size = min(size, self.limit)
        waiter = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            if waiter[1].done() and not waiter[1].cancelled():  # granted, but the caller has gone
                self.release(size)
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
                self.release(0)  # the ones behind it may fit now
            raise
        return size

    def release(self, size: int) -> None:
        self.used -= size
        while self._waiting and self._fits(self._waiting[0][0]):
            size, future = self._waiting.popleft()
            if not future.done():
                self.used += size
                future.set_result(None)
