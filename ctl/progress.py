"""Progress bars for long work (decoding, feature extraction, training), on stderr."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "it"):
    """A tqdm bar with rate and ETA; in non-interactive logs it prints every 30 s instead of redrawing."""
    interactive = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,
        disable=os.environ.get("CTL_PROGRESS") == "0" or total == 0,
    )
    try:
        yield bar
    finally:
        bar.close()
