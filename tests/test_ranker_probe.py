"""What the ranker's dependency probe logs (issue 14 review): each new reason for NOT_SERVING once, when it
changes (before: only when SERVING flipped, so a second reason was never logged); a probe that raises (a
bug): its traceback once per distinct error, then one line at most every minute (before: a traceback on
every probe interval for as long as the bug lasted). No sleeps to wait out: the probe's own steps are
awaited, and the clock of the repeat is a fake one."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ranker_service import server as ranker_server
from ranker_service.config import RankerConfig
from ranker_service.server import ProbeErrorLog, Ranker

LOGGER = ranker_server.__name__


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _raise(message: str) -> None:
    raise RuntimeError(message)  # one line raises every error of these tests: "the same error"


def _failure(message: str) -> RuntimeError:
    try:
        _raise(message)
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def test_a_persistent_error_is_a_traceback_once_then_a_line_a_minute(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = _Clock()
    errors = ProbeErrorLog(repeat_s=60, clock=clock)
    for i in range(30):  # a probe every 5 s for 150 s, each error's message differs (a counter in it)
        errors.failed(_failure(f"bug {i}"))
        clock.now += 5
    records = _records(caplog)
    assert [r.exc_info is not None for r in records] == [True, False, False]
    first, *repeats = records
    assert first.getMessage() == "the dependency probe failed" and first.exc_info[1].args == ("bug 0",)
    assert [r.getMessage() for r in repeats] == [
        "the dependency probe still fails: 12 more times in 60 s, now: RuntimeError: bug 12",
        "the dependency probe still fails: 12 more times in 60 s, now: RuntimeError: bug 24",
    ]


def test_another_error_or_the_same_after_a_success_shows_its_traceback_again(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    errors = ProbeErrorLog(repeat_s=60, clock=_Clock())
    errors.failed(_failure("bug"))
    errors.failed(_failure("bug"))
    errors.failed(KeyError("other"))  # raised elsewhere: another error
    errors.succeeded()
    errors.failed(_failure("bug"))  # back after a success: shown whole again
    assert [r.exc_info is not None for r in _records(caplog)] == [True, True, True]


@pytest.fixture
def ranker(tmp_path):
    """A ranker built (not started) on its own loop; its probe is run by hand below."""
    loop = asyncio.new_event_loop()

    async def build() -> Ranker:
        config = RankerConfig(
            host="127.0.0.1", port=0, metrics_port=-1, encoder="127.0.0.1:9", probe_interval_s=0.1,
            store_path=str(tmp_path / "store"),
        )  # fmt: skip
        return Ranker(config)

    built = loop.run_until_complete(build())
    yield loop, built
    loop.run_until_complete(built.encoder.close())
    loop.close()


def test_each_reason_is_logged_once_when_it_changes(ranker, caplog):
    """Down, then serving another model (reason B while NOT_SERVING all along), a bug twice, then back."""
    loop, built = ranker
    caplog.set_level(logging.INFO, logger=LOGGER)
    built._probe_log = ProbeErrorLog(repeat_s=60, clock=_Clock())
    script = ["A down", "A down", "B another model", "B another model", "bug", "bug", None, None]
    done = asyncio.Event()
    states: list[bool] = []

    async def failing_dependency(store, info):
        step = script.pop(0)
        if not script:
            done.set()
        if step == "bug":
            _raise("probe bug")
        return step

    async def set_serving(serving: bool) -> None:
        states.append(serving)

    built._failing_dependency = failing_dependency
    built.server.set_serving = set_serving

    async def run() -> None:
        probe = asyncio.create_task(built._probe_dependencies(store=None, info=None))
        await done.wait()
        await asyncio.sleep(0)  # the last step's logging and health
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe

    loop.run_until_complete(asyncio.wait_for(run(), timeout=60))
    records = _records(caplog)
    assert [(r.getMessage(), r.exc_info is not None) for r in records] == [
        ("A down: NOT_SERVING", False),
        ("B another model: NOT_SERVING", False),
        ("the dependency probe failed", True),
        ("the dependency probe fails (RuntimeError, logged above): NOT_SERVING", False),
        ("the encoder and the store are back: SERVING", False),
    ]
    assert states == [False, True]  # health set when it flips, not on every probe
