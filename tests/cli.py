"""The `ctl` command line as a user runs it, for tests: a fresh `python -m ctl_app.cli` process in the
repository, its output captured as text."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

from tests.servers import REPO


def ctl_command(*args: str) -> list[str]:
    """The argv of `ctl ARGS` (this interpreter, so the test's virtual environment)."""
    return [sys.executable, "-m", "ctl_app.cli", *args]


def run_ctl(
    *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs `ctl ARGS` in the repository and waits for it: exit status, stdout and stderr as text; a
    failing exit is the caller's to assert. `timeout` (seconds) is only a hang guard; `env` replaces the
    environment (None: this process's)."""
    return subprocess.run(
        ctl_command(*args),
        cwd=REPO,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
