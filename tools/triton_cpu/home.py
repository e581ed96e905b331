"""Where the Triton CPU installation lives (its "home"), the versions it was set up with, and the
environment the server and its Python-backend stub run in.

Pitfalls the environment encodes (found on this machine):
- the stub embeds libpython (`libpython3.X.so.1.0`, no RPATH to it): without help the dynamic loader
  takes whatever the system has (here Debian's 3.11.2 while the pyenv is pyenv's 3.11.7 - it happened
  to work, but mixing patch versions of the core and the standard library is asking for trouble), so
  LD_LIBRARY_PATH starts with the LIBDIR of the interpreter that made `home/pyenv`, which must be built
  with --enable-shared. The binaries find `nvidia_pytriton.libs/` through their RPATHs as long as the
  wheel's layout is kept (`backends/python/` is as deep as `python_backend_stubs/X.Y/`, so the copied
  stub's `$ORIGIN/../../../../nvidia_pytriton.libs` still resolves); it goes on LD_LIBRARY_PATH anyway;
- the embedded interpreter finds its packages through PATH (it looks for `python3` there, and
  `pyvenv.cfg` next to it makes it the venv), so `home/pyenv/bin` goes first on PATH; PYTHONPATH,
  PYTHONHOME and the user site are kept out so the caller's environment cannot leak in.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.triton_cpu.errors import TritonCpuError

REPO = Path(__file__).resolve().parents[2]  # the checkout
PYTRITON_VERSION = "0.7.0"
TRITONSERVER_VERSION = "2.51.0"  # bundled by nvidia-pytriton 0.7.0 (its server metadata says so)
TORCH_VERSION = "2.13.0"
NUMPY_SPEC = "numpy<2"
SETUP_FORMAT = 1  # bump when the layout of the home changes: setup() then redoes its steps
MARKER = "setup.json"
SERVER_DIR = "server"  # the wheel's layout under it, so that the binaries' RPATHs keep working
TRITON_ROOT = "pytriton/tritonserver"
LIBS_DIR = "nvidia_pytriton.libs"
STUB = "triton_python_backend_stub"
PYENV = "pyenv"
MAKE_HINT = "run `make triton-cpu` (or: python -m tools.triton_cpu setup --home {home})"


def default_home() -> Path:
    """`$CTL_TRITON_HOME`, or `.triton-cpu` at the root of the checkout."""
    return Path(os.environ.get("CTL_TRITON_HOME") or REPO / ".triton-cpu").resolve()


def check_shell_safe(path: Path, what: str) -> None:
    """The Python backend starts its stub through `bash -c` with the paths unquoted: a space (or any
    shell character) in the home's or the repository's path leaves the model loading forever."""
    unsafe = sorted({c for c in str(path) if c.isspace() or c in "\"'$`\\;&|<>()*?[]{}"})
    if unsafe:
        raise TritonCpuError(
            f"the {what} {str(path)!r} contains {''.join(unsafe)!r}: Triton's Python backend launches its "
            "stub through `bash -c` without quoting, so it cannot live there; use a path without spaces "
            "or shell characters (for the home: --home or CTL_TRITON_HOME)"
        )


def python_mm() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def expected_marker(*, this_python: bool = True) -> dict[str, Any]:
    """What setup.json must say. `this_python`: and made with the interpreter running this code (setup
    wants that; merely using a home does not: the server runs the pyenv's interpreter, not ours)."""
    expected: dict[str, Any] = {
        "format": SETUP_FORMAT,
        "pytriton": PYTRITON_VERSION,
        "tritonserver": TRITONSERVER_VERSION,
        "torch": TORCH_VERSION,
        "numpy_spec": NUMPY_SPEC,
    }
    if this_python:
        expected["python"] = sys.version.split()[0]
    return expected


@dataclass(frozen=True)
class TritonHome:
    """A set-up home: the server, its Python backend (with stub) and the backend's Python environment."""

    home: Path
    versions: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.home / SERVER_DIR / TRITON_ROOT

    @property
    def server(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def stub(self) -> Path:
        return self.backends / "python" / STUB

    @property
    def libs(self) -> Path:
        return self.home / SERVER_DIR / LIBS_DIR

    @property
    def pyenv(self) -> Path:
        return self.home / PYENV

    @property
    def python_libdir(self) -> Path:
        """LIBDIR of the interpreter that made the pyenv: where the stub's libpython comes from."""
        return Path(self.versions["python_libdir"])

    def missing(self) -> list[str]:
        """Files a working home must have; empty when all are there."""
        needed = [self.server, self.stub, self.backends / "python" / "libtriton_python.so"]
        needed.append(self.pyenv / "bin" / "python3")
        if self.versions.get("python_libdir"):
            needed.append(self.python_libdir / self.versions["libpython"])
        return [str(p) for p in needed if not p.exists()]

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment tritonserver (and through it the stub) must run in."""
        env = dict(os.environ if base is None else base)
        for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CONDA_PREFIX"):
            env.pop(name, None)
        env["PYTHONNOUSERSITE"] = "1"  # ~/.local (maybe numpy 2) must not reach the stub
        env["PATH"] = os.pathsep.join(filter(None, [str(self.pyenv / "bin"), env.get("PATH", "")]))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [str(self.python_libdir), str(self.libs), env.get("LD_LIBRARY_PATH", "")])
        )
        return env


# --------------------------------------------------------------------------------------------- setup


def load_marker(home: Path, *, this_python: bool) -> tuple[TritonHome | None, str]:
    """The home if its setup.json fits and its files are there, else None and why not."""
    try:
        versions = json.loads((home / MARKER).read_text())
    except FileNotFoundError:
        return None, f"no {MARKER}"
    except (OSError, ValueError) as error:
        return None, f"unreadable {MARKER}: {error}"
    expected = expected_marker(this_python=this_python)
    differ = [f"{k} {versions.get(k)!r}, expected {v!r}" for k, v in expected.items() if versions.get(k) != v]
    if differ:
        return None, f"set up for other versions: {'; '.join(differ)}"
    found = TritonHome(home, versions)
    missing = found.missing()
    if missing:
        return None, f"missing {', '.join(missing)}"
    return found, ""
