"""Commands the setup runs, their output logged, and the disk a folder takes."""

from __future__ import annotations

import logging
import subprocess
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from tools.triton_cpu.errors import TritonCpuError

log = logging.getLogger(__name__)


def run_logged(cmd: Sequence[str], what: str, hint: str, env: dict[str, str] | None = None) -> None:
    """Run a command, its output at DEBUG level; on failure raise with the output's tail and a hint."""
    log.debug("$ %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except OSError as error:
        raise TritonCpuError(f"{what} failed: {error}. {hint}") from error
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        log.debug("  %s", line.rstrip())
    if proc.wait() != 0:
        output = "\n".join(f"    {line}" for line in tail)
        raise TritonCpuError(
            f"{what} failed (exit status {proc.returncode}): {' '.join(cmd)}\n"
            f"  last output:\n{output}\n  {hint}"
        )


def disk_usage(path: Path) -> str:
    total = sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())
    return f"{total / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------- twin
