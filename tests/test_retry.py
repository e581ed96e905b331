"""ctl.retry: the pauses every retrying caller uses (the ranker at start-up, ctl ingest, ctl fetch-images)."""

import itertools

from ctl.retry import backoff


def test_pauses_double_up_to_the_cap():
    assert list(itertools.islice(backoff(0.2, 5.0), 7)) == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert list(itertools.islice(backoff(0.5, 10.0), 6)) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_a_first_pause_above_the_cap_is_capped_too():
    assert list(itertools.islice(backoff(60.0, 30.0), 2)) == [30.0, 30.0]


def test_jitter_draws_from_the_upper_half_of_each_pause():
    for _ in range(50):
        pauses = list(itertools.islice(backoff(1.0, 30.0, jitter=True), 8))
        for pause, full in zip(pauses, [1, 2, 4, 8, 16, 30, 30, 30], strict=True):
            assert full / 2 <= pause <= full


def test_no_pause_stays_no_pause():
    assert list(itertools.islice(backoff(0.0, 30.0, jitter=True), 3)) == [0.0, 0.0, 0.0]
