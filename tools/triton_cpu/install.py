"""`setup`: make a home a working Triton-on-CPU installation, once (idempotent, locked, recorded in
`home/setup.json`; a second run returns at once). The steps are in `wheel` and `pyenv`.

The home holds a `*` .gitignore, so git and ruff (which lints the whole checkout and respects .gitignore)
never look inside - the server ships Python files that are not ours to lint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tools.triton_cpu.errors import NotSetUpError, TritonCpuError
from tools.triton_cpu.home import (
    MAKE_HINT,
    MARKER,
    PYTRITON_VERSION,
    TRITONSERVER_VERSION,
    TritonHome,
    check_shell_safe,
    default_home,
    expected_marker,
    load_marker,
    python_mm,
)
from tools.triton_cpu.pyenv import make_pyenv
from tools.triton_cpu.shell import disk_usage
from tools.triton_cpu.wheel import download_wheel, extract, install_stub

log = logging.getLogger(__name__)


def setup(home: Path | str | None = None, *, install: bool = True) -> TritonHome:
    """Make HOME a working Triton-on-CPU installation (idempotent; instant when already done).

    With `install=False` nothing is downloaded or installed: a home that is not set up (or was set up
    for another interpreter or other versions) raises NotSetUpError, whose message says what to run.
    """
    home = Path(home).resolve() if home is not None else default_home()
    check_shell_safe(home, "Triton CPU home")
    found, why = load_marker(home, this_python=install)
    if found is not None:
        if install:
            _ignore_in_git(home)
        return found
    if not install:
        raise NotSetUpError(
            f"the Triton CPU home {home} is not set up ({why}): " + MAKE_HINT.format(home=home)
        )
    log.info("Triton CPU home %s: %s", home, why)
    home.mkdir(parents=True, exist_ok=True)
    _ignore_in_git(home)
    with _locked(home / ".lock"):
        found, _ = load_marker(home, this_python=True)  # another process may have done it meanwhile
        if found is not None:
            return found
        return _setup_locked(home)


def _ignore_in_git(home: Path) -> None:
    """A `*` .gitignore in the home (as venv does): git, and ruff with it, never look inside, wherever
    the home is - `make test` lints the whole checkout, and the server ships Python files."""
    ignore = home / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# made by tools/triton_cpu: nothing here belongs in git\n*\n")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _setup_locked(home: Path) -> TritonHome:
    started = time.monotonic()
    log.info(
        "setting up Triton %s (nvidia-pytriton %s) for CPU in %s",
        TRITONSERVER_VERSION,
        PYTRITON_VERSION,
        home,
    )
    (home / MARKER).unlink(missing_ok=True)
    libdir, libpython = _check_platform()
    wheel = _step("1/4 download the nvidia-pytriton wheel", download_wheel, home)
    _step("2/4 extract tritonserver, the Python backend and its stub", extract, wheel, home)
    _step("3/4 install the stub into backends/python", install_stub, home)
    versions = _step("4/4 create the backend's Python environment (torch, numpy<2)", make_pyenv, home)
    marker = {
        **expected_marker(),
        "python_executable": str(Path(sys.executable)),
        "python_libdir": str(libdir),
        "libpython": libpython,
        "stub_python": python_mm(),
        "pyenv_torch": versions["torch"],
        "pyenv_numpy": versions["numpy"],
        "wheel": wheel.name,
    }
    result = TritonHome(home, marker)
    missing = result.missing()
    if missing:
        raise TritonCpuError(f"setup finished but these are missing: {', '.join(missing)}")
    (home / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    log.info("Triton CPU home ready in %.1f s: %s (%s)", time.monotonic() - started, home, disk_usage(home))
    return result


def _step(title: str, func: Any, *args: Any) -> Any:
    log.info("%s ...", title)
    started = time.monotonic()
    result = func(*args)
    log.info("%s: done in %.1f s", title, time.monotonic() - started)
    return result


def _check_platform() -> tuple[Path, str]:
    """The wheel is manylinux_2_35 x86_64; the stub needs this interpreter's shared libpython."""
    machine = os.uname().machine
    if sys.platform != "linux" or machine != "x86_64":
        raise TritonCpuError(
            f"nvidia-pytriton {PYTRITON_VERSION} is for Linux x86_64 only (this is {sys.platform} {machine})"
        )
    glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    try:
        major, minor = (int(x) for x in glibc.split()[-1].split(".")[:2])
    except (ValueError, IndexError):
        major, minor = 0, 0
    if (major, minor) < (2, 35):
        raise TritonCpuError(
            f"tritonserver from nvidia-pytriton {PYTRITON_VERSION} needs glibc >= 2.35 (found {glibc!r})"
        )
    mm = python_mm()
    if mm not in ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13"):
        raise TritonCpuError(
            f"nvidia-pytriton {PYTRITON_VERSION} has Python backend stubs for 3.8-3.13, not {mm}"
        )
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    libpython = sysconfig.get_config_var("INSTSONAME") or f"libpython{mm}.so.1.0"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (libdir / libpython).exists():
        raise TritonCpuError(
            f"the Python backend stub embeds libpython, but {sys.executable} ({sys.version.split()[0]}) "
            f"has no shared {libpython} in {libdir!s}: use an interpreter built with --enable-shared "
            "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...)"
        )
    return libdir, libpython
