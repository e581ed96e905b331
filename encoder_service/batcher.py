"""Micro-batching: concurrent requests share one forward pass.

A model costs far less per image in a batch than one image at a time (DESIGN.md §2: ResNet-50 on this CPU
is fastest at batch 8; a GPU wants more). Each request (1..n images) joins a queue; a worker takes as
many requests as fit in `max_batch` images, waiting at most `max_wait` after the first arrived, runs one
forward pass and hands every request its slice of the outputs, in order. `workers` passes may be in flight
at once: one for an in-process model (it already uses every core), several for Triton, whose own dynamic
batcher merges what several workers and encoder replicas send. The queue is bounded in images:
a request that would overflow it is refused at once (Overloaded), before it waits for anything; so is
one whose caller's deadline would pass before the images queued ahead of it and its own are through, at
the rate the recent passes ran (it would only time out, after taking its place in the queue).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from encoder_service.errors import BackendUnavailable, Overloaded

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], Awaitable[tuple[np.ndarray, ...]]]


@dataclass
class _Request:
    images: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, ...]]
    arrived: float


class MicroBatcher:
    """Merges concurrent `submit` calls into forward passes of at most `max_batch` images.

    `pending_images` counts images admitted and not yet in a running forward pass; over `max_queue`,
    `submit` raises Overloaded. `forward_passes` counts passes run (also exported as a Prometheus counter
    with the batch sizes in a histogram, when given).
    """

    def __init__(
        self,
        name: str,
        forward: Forward,
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        workers: int = 1,
        batch_images: Histogram | None = None,
        passes: Counter | None = None,
        rejected: Counter | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0 or workers < 1:
            raise ValueError(
                f"max_batch={max_batch}, max_queue={max_queue}, max_wait_s={max_wait_s}, workers={workers}"
            )
        self.name = name
        self._forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.workers = workers
        self._batch_images = batch_images
        self._passes = passes
        self._rejected = rejected
        self._queue: collections.deque[_Request] = collections.deque()
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self.pending_images = 0
        self.forward_passes = 0
        self.images_per_s: float | None = None  # recent throughput of the passes (all workers)

    def start(self) -> None:
        """Starts the worker tasks on the running loop."""
        if not self._tasks:
            for i in range(self.workers):
                task = asyncio.create_task(self._work(), name=f"batcher-{self.name}-{i}")
                task.add_done_callback(self._worker_done)
                self._tasks.append(task)

    def _worker_done(self, task: asyncio.Task) -> None:
        """A worker that died of a bug must not leave callers waiting forever (its own batch was failed
        by `_work`); when it was the last one, what is queued is failed too and leaves the count."""
        if not task.cancelled() and task.exception() is not None:
            log.error("the %s batcher stopped", self.name, exc_info=task.exception())
            if not any(not t.done() for t in self._tasks):
                self._drop_queue(BackendUnavailable(f"the {self.name} encoder stopped: see the log"))

    def _drop_queue(self, exc: BaseException) -> None:
        """Fails every queued request with `exc` and takes its images off the count."""
        _fail(list(self._queue), exc)
        self.pending_images -= sum(len(r.images) for r in self._queue)
        self._queue.clear()

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks) and not self._closed

    async def submit(self, images: np.ndarray, remaining_s: float | None = None) -> tuple[np.ndarray, ...]:
        """The forward outputs for `images` [n, ...] (n >= 1), each [n, ...]. Requests larger than
        `max_batch` are split into several queue entries (and possibly several passes). `remaining_s`: the
        seconds the caller still waits (None: no deadline)."""
        n = len(images)
        if n < 1:
            raise ValueError("submit needs at least one image")
        if not self.running:
            raise BackendUnavailable(f"the {self.name} encoder is not running")
        if self.pending_images + n > self.max_queue:
            if self._rejected is not None:
                self._rejected.inc(n)
            raise Overloaded(
                f"the {self.name} encoder is overloaded: {self.pending_images} images are waiting and "
                f"{n} more would pass the limit of {self.max_queue}; retry later"
            )
        if remaining_s is not None and self.images_per_s:
            expected = (self.pending_images + n) / self.images_per_s
            if expected > remaining_s:
                if self._rejected is not None:
                    self._rejected.inc(n)
                raise Overloaded(
                    f"the {self.name} encoder cannot finish {n} images within the call's deadline "
                    f"({remaining_s:.2f} s): {self.pending_images} images are queued ahead and it encodes "
                    f"about {self.images_per_s:.0f} images/s (~{expected:.2f} s); retry later or with a "
                    "longer deadline"
                )
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, n, self.max_batch):
            future: asyncio.Future[tuple[np.ndarray, ...]] = loop.create_future()
            self._queue.append(_Request(images[start : start + self.max_batch], future, loop.time()))
            futures.append(future)
        self.pending_images += n
        self._arrived.set()
        # return_exceptions: if one part fails, the others' outcomes are still collected (no
        # "exception was never retrieved"); cancelling this call cancels the parts not yet started.
        parts = await asyncio.gather(*futures, return_exceptions=True)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        if len(parts) == 1:
            return parts[0]  # type: ignore[return-value]
        return tuple(np.concatenate(arrays) for arrays in zip(*parts))  # type: ignore[arg-type]

    def _drop_abandoned(self) -> None:
        """Drops the requests at the head of the queue whose callers went away (deadline passed,
        client gone): they leave the queue and the count, and nothing else does."""
        while self._queue and self._queue[0].future.done():
            self.pending_images -= len(self._queue.popleft().images)

    def _take(self) -> _Request | None:
        """The next queued request whose caller still waits (the abandoned ones before it dropped)."""
        self._drop_abandoned()
        return self._queue.popleft() if self._queue else None

    async def _next_batch(self, batch: list[_Request]) -> None:
        """Fills `batch` (the caller's, so that a cancellation can fail what it already holds)."""
        loop = asyncio.get_running_loop()
        first = self._take()
        while first is None:
            self._arrived.clear()
            await self._arrived.wait()
            first = self._take()
        batch.append(first)
        size = len(first.images)
        gather_until = first.arrived + self.max_wait_s  # loop time: the batch waits no longer for more
        while size < self.max_batch:
            self._drop_abandoned()
            if self._queue:
                if size + len(self._queue[0].images) > self.max_batch:
                    break
                request = self._queue.popleft()
                batch.append(request)
                size += len(request.images)
                continue
            wait_s = gather_until - loop.time()
            if wait_s <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait_s)
            except asyncio.TimeoutError:
                break

    async def _work(self) -> None:
        batch: list[_Request] = []
        try:
            while True:
                batch = []
                try:
                    await self._next_batch(batch)
                finally:  # taken: in a pass now, or failed below; either way no longer queued
                    self.pending_images -= sum(len(r.images) for r in batch)
                live = [r for r in batch if not r.future.done()]  # callers cancelled while it formed
                if live:
                    await self._run(live)
        except asyncio.CancelledError:
            _fail(batch, BackendUnavailable(f"the {self.name} encoder is shutting down"))
            raise
        except BaseException as exc:  # a bug: the batch in hand is failed too (`_worker_done` logs it)
            _fail(batch, BackendUnavailable(f"the {self.name} encoder stopped: {type(exc).__name__}: {exc}"))
            raise

    async def _run(self, batch: list[_Request]) -> None:
        """One forward pass; its outcome (outputs or error) goes to every request of the batch."""
        self.forward_passes += 1
        if self._passes is not None:
            self._passes.inc()
        started = time.perf_counter()
        try:
            images = batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch])
            if self._batch_images is not None:
                self._batch_images.observe(len(images))
            outputs = await self._forward(images)
            answers = []
            offset = 0
            for request in batch:
                n = len(request.images)
                answers.append(tuple(o[offset : offset + n] for o in outputs))
                offset += n
        except Exception as exc:  # the backend's error (or unstackable inputs) is every request's error
            _fail(batch, exc)
            return
        rate = len(images) * self.workers / max(time.perf_counter() - started, 1e-6)
        self.images_per_s = rate if self.images_per_s is None else 0.7 * self.images_per_s + 0.3 * rate
        for request, answer in zip(batch, answers):
            if not request.future.done():
                request.future.set_result(answer)

    async def close(self) -> None:
        """Stops the workers; requests still queued (or in passes being cancelled) get BackendUnavailable."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # one that died of a bug was logged
        self._drop_queue(BackendUnavailable(f"the {self.name} encoder is shutting down"))


def _fail(batch: list[_Request], exc: BaseException) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)
