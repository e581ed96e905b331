"""MicroBatcher under cancellation: every live caller gets its own answer and the queue count returns to 0.

The forward function is a real asyncio backend the test controls (a gate it opens, a count of passes in
flight); no fault is mocked. Nothing here waits on the clock: the order of events is set by the gate and
by yielding to the event loop, and "everything is through" is read from the batcher, not timed.
"""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoder_service.batcher import MicroBatcher


class Backend:
    """A forward pass that waits for `gate` (open by default): outputs are (2x, x + 0.5) of each row, so a
    caller's answer shows which rows it came from."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.sizes: list[int] = []

    async def release(self) -> None:
        """Lets the passes now held at the closed gate through (and only them), then the loop run."""
        self.gate.set()
        self.gate.clear()
        await _spin()

    async def forward(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        self.in_flight += 1
        try:
            self.sizes.append(len(images))
            await self.gate.wait()
            await asyncio.sleep(0)  # a pass always yields once, as a real one does
            return images[:, 0] * 2, images[:, 0] + 0.5
        finally:
            self.in_flight -= 1


async def _spin(turns: int = 20) -> None:
    """Lets every task that is ready run (a bounded number of event-loop turns, no clock)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def _idle(batcher: MicroBatcher, backend: Backend) -> None:
    """Until nothing is queued and no pass runs (bounded: a batcher that never gets there fails)."""
    for _ in range(10_000):
        if not batcher._queue and backend.in_flight == 0:
            await _spin()
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the batcher never went idle: {len(batcher._queue)} queued")


def _rows(first: int, n: int) -> np.ndarray:
    return np.arange(first, first + n, dtype=float)[:, None]


def _check_answer(answer: tuple[np.ndarray, ...], rows: np.ndarray) -> None:
    assert np.array_equal(answer[0], rows[:, 0] * 2)
    assert np.array_equal(answer[1], rows[:, 0] + 0.5)


def test_a_cancelled_request_at_the_head_does_not_take_the_next_one_with_it():
    """Reproduces issue 14, item 1. While a pass runs, three requests queue: live, cancelled, live. The
    next batch starts with the first; the cancelled one is then at the head of the queue and must be
    dropped alone: the live one behind it gets its answer, and the count of queued images returns to 0."""

    async def scenario() -> None:
        backend = Backend()
        batcher = MicroBatcher("t", backend.forward, max_batch=8, max_wait_s=0.0, max_queue=64)
        batcher.start()
        backend.gate.clear()
        busy = asyncio.create_task(batcher.submit(_rows(0, 1)))
        await _spin()
        assert backend.sizes == [1]  # the worker is in a pass, held at the gate
        first = asyncio.create_task(batcher.submit(_rows(10, 1)))
        abandoned = asyncio.create_task(batcher.submit(_rows(20, 2)))
        behind = asyncio.create_task(batcher.submit(_rows(30, 3)))
        await _spin()
        abandoned.cancel()  # the caller's deadline passed, or it went away
        await _spin()
        assert batcher.pending_images == 1 + 2 + 3
        backend.gate.set()
        _check_answer(await busy, _rows(0, 1))
        _check_answer(await first, _rows(10, 1))
        await _idle(batcher, backend)
        assert behind.done(), "the live request behind the cancelled one was lost"
        _check_answer(behind.result(), _rows(30, 3))
        assert batcher.pending_images == 0
        assert backend.sizes == [1, 1 + 3]  # the cancelled request's images never ran
        behind.cancel()
        await batcher.close()

    asyncio.run(scenario())


def test_lost_requests_no_longer_fill_the_queue_for_ever():
    """The consequence the issue reported: with the cancelled-head pattern repeated, leaked images used to
    pile up until every call was refused (Overloaded). max_queue 8, 20 rounds of 3 images: all served."""

    async def scenario() -> None:
        backend = Backend()
        batcher = MicroBatcher("t", backend.forward, max_batch=4, max_wait_s=0.0, max_queue=8)
        batcher.start()
        for r in range(20):
            backend.gate.clear()
            busy = asyncio.create_task(batcher.submit(_rows(100 * r, 1)))
            await _spin()
            tasks = [asyncio.create_task(batcher.submit(_rows(100 * r + 10 * k, 1))) for k in range(1, 4)]
            await _spin()
            tasks[1].cancel()
            await _spin()
            backend.gate.set()
            await busy
            await _idle(batcher, backend)
            for k in (0, 2):
                assert tasks[k].done(), f"round {r}: request {k} was lost"
                _check_answer(tasks[k].result(), _rows(100 * r + 10 * (k + 1), 1))
            assert batcher.pending_images == 0, f"round {r}"
        await batcher.close()

    asyncio.run(scenario())


def test_a_multi_part_request_cancelled_leaves_nothing_behind():
    """n > max_batch: the request is split into parts (2, 2, 2, 1). Cancelled while queued behind a live
    request, its parts are at the head of the queue while that request's batch forms; cancelled while its
    first part runs, the others are still queued. Either way the live request behind it is served and
    nothing stays counted."""

    async def scenario() -> None:
        backend = Backend()
        batcher = MicroBatcher("t", backend.forward, max_batch=2, max_wait_s=0.0, max_queue=64)
        batcher.start()
        for phase in ("queued", "running"):
            backend.gate.clear()
            head = asyncio.create_task(batcher.submit(_rows(0, 1)))
            await _spin()
            before = asyncio.create_task(batcher.submit(_rows(5, 1)))
            big = asyncio.create_task(batcher.submit(_rows(10, 7)))
            after = asyncio.create_task(batcher.submit(_rows(50, 1)))
            await _spin()
            if phase == "running":
                for _ in range(2):  # the passes of `head`, then of `before`, go through
                    await backend.release()
                assert backend.sizes[-1] == 2 and backend.in_flight == 1  # big's first part runs
            big.cancel()
            await _spin()
            backend.gate.set()
            await _idle(batcher, backend)
            _check_answer(head.result(), _rows(0, 1))
            assert big.cancelled()
            for task, rows in ((before, _rows(5, 1)), (after, _rows(50, 1))):
                assert task.done(), f"{phase}: a live request was lost"
                _check_answer(task.result(), rows)
            assert batcher.pending_images == 0, phase
        await batcher.close()

    asyncio.run(scenario())


def test_a_worker_that_dies_fails_its_callers_and_releases_the_queue():
    """A bug in a pass (here: requests whose images cannot be stacked into one batch) must not leave the
    callers of that batch waiting for ever, nor any image counted as queued."""

    async def scenario() -> None:
        backend = Backend()
        batcher = MicroBatcher("t", backend.forward, max_batch=8, max_wait_s=0.0, max_queue=64)
        batcher.start()
        backend.gate.clear()
        busy = asyncio.create_task(batcher.submit(_rows(0, 1)))
        await _spin()
        mismatched = [
            asyncio.create_task(batcher.submit(np.ones((1, 1)))),
            asyncio.create_task(batcher.submit(np.ones((1, 2)))),  # cannot join the batch of the first
        ]
        await _spin()
        backend.gate.set()
        await busy
        await _idle(batcher, backend)
        assert all(t.done() for t in mismatched), "callers of a failed pass were left waiting"
        assert all(isinstance(t.exception(), ValueError) for t in mismatched)
        assert batcher.pending_images == 0
        assert batcher.running  # the pass failed its own requests; the worker goes on
        _check_answer(await batcher.submit(_rows(7, 1)), _rows(7, 1))
        await batcher.close()

    asyncio.run(scenario())


# ---- any order of submits, cancellations and passes

_ROUND = st.tuples(
    # the requests of the round: (images, cancelled later?, event-loop turns after submitting it)
    st.lists(st.tuples(st.integers(1, 7), st.booleans(), st.integers(0, 2)), min_size=1, max_size=6),
    st.integers(0, 3),  # passes let through before the cancellations
    st.booleans(),  # the gate is left open after the round
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rounds=st.lists(_ROUND, min_size=1, max_size=6), max_batch=st.integers(1, 5), workers=st.integers(1, 2)
)
def test_every_live_request_gets_exactly_its_own_outputs(rounds, max_batch, workers):
    """Random rounds: with the backend's gate closed, requests of 1..7 images arrive (larger than
    max_batch: split into parts), some passes are let through, some requests are cancelled (queued, in a
    forming batch or in a pass), the gate is opened or left closed. At the end: every request not
    cancelled has exactly its own rows' outputs, no row ran twice, and no image is still counted as
    queued."""

    async def scenario() -> None:
        backend = Backend()
        batcher = MicroBatcher(
            "t", backend.forward, max_batch=max_batch, max_wait_s=0.0, max_queue=10_000, workers=workers
        )
        batcher.start()
        requests: list[tuple[asyncio.Task, np.ndarray]] = []
        next_row = 0
        for arrivals, passes, open_after in rounds:
            backend.gate.clear()
            cancel = []
            for n, cancelled, turns in arrivals:
                rows = _rows(next_row, n)
                next_row += n
                requests.append((asyncio.create_task(batcher.submit(rows)), rows))
                if cancelled:
                    cancel.append(requests[-1][0])
                await _spin(turns)
            await _spin()
            for _ in range(passes):
                await backend.release()
            for task in cancel:
                task.cancel()
            await _spin()
            if open_after:
                backend.gate.set()
        backend.gate.set()
        await _idle(batcher, backend)
        for task, rows in requests:
            assert task.done(), f"a request of {len(rows)} images (rows from {rows[0, 0]:.0f}) was lost"
            if not task.cancelled():
                _check_answer(task.result(), rows)
        assert batcher.pending_images == 0
        assert sum(backend.sizes) <= next_row  # no row ran twice
        await batcher.close()

    asyncio.run(scenario())
