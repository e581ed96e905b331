"""The pauses between attempts, written once: exponential backoff with a cap, and jitter where many
clients may retry together.

Each caller keeps its own numbers (first pause, cap) and its own idea of which failures pass; this module
only says how long to wait before the next attempt.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff(first_s: float, cap_s: float, *, jitter: bool = False) -> Iterator[float]:
    """Pauses in seconds, endless: `first_s`, then doubled each time, never above `cap_s`. With `jitter`,
    each pause is drawn from its upper half ([pause / 2, pause]), so that clients failed by the same
    outage do not all come back at the same instant."""
    pause = first_s
    while True:
        capped = min(pause, cap_s)
        yield random.uniform(capped / 2, capped) if jitter else capped
        pause *= 2
