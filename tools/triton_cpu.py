"""A real Triton Inference Server on this CPU, serving the exported encoders (tests and developers).

Why. `ctl export` writes a Triton model repository for the GPU: `pytorch_libtorch`, KIND_GPU instances
(DESIGN.md §2). Triton ships as NGC containers, which a machine without a GPU or Docker cannot use; the
only Triton on PyPI is the one bundled in NVIDIA's PyTriton wheel: `nvidia-pytriton==0.7.0` carries the
`tritonserver` 2.51 binary with the Python backend and no libtorch backend (a `pytorch_libtorch` model
fails with "unable to find backend library for backend 'pytorch'"). So the server is real - the same
gRPC API, model configuration, dynamic batcher and statistics as in production - and only the backend
differs: the tests serve a CPU *twin* of the exported repository, whose Python-backend `model.py` runs
the very same exported `model.pt`.

Recipe (what the functions below do):
1. `setup(home)` (idempotent; `home/setup.json` records the versions, a second run returns at once):
   - `python -m pip download nvidia-pytriton==0.7.0 --no-deps` into HOME (55 MB, only when missing);
   - extract from the wheel only `pytriton/tritonserver/bin/tritonserver`, `backends/python/*`, the
     stub for this interpreter's major.minor (`python_backend_stubs/X.Y/triton_python_backend_stub`)
     and the libraries of `nvidia_pytriton.libs/` that these files link to (Python's zipfile does not
     restore permissions: they are set from the archive, and the executables made executable);
   - copy the stub into `backends/python/` (where the Python backend looks for it);
   - create `home/pyenv`: a venv of the interpreter running this script (no system site packages),
     with `torch==2.13.0` and `numpy<2`.
2. `write_twin(exported_repo, out)`: for every model of the exported repository, the same
   config.pbtxt (parsed with tritonclient's `model_config_pb2.ModelConfig`: same name, tensors, dims,
   max_batch_size, dynamic batching, parameters such as `model_version`) with `backend: "python"`
   instead of `platform`, KIND_CPU instances and a `torchscript_path` parameter holding the absolute
   path of the exported `model.pt`; plus `<version>/model.py`, which `torch.jit.load`s that file and
   runs each batch Triton forms under `torch.inference_mode` (one response per request, in order).
3. `start(home, repo)`: run `tritonserver --model-repository REPO --backend-directory
   HOME/server/pytriton/tritonserver/backends --grpc-port P` (HTTP and metrics off unless asked) with
   the environment the stub needs, and wait for the server and every model to be ready over gRPC.

Pitfalls this encodes (found on this machine; see also the report of the session that wrote it):
- the stub embeds libpython (`libpython3.X.so.1.0`, no RPATH to it): without help the dynamic loader
  takes whatever the system has (here Debian's 3.11.2 while the pyenv is pyenv's 3.11.7 - it happened
  to work, but mixing patch versions of the core and the standard library is asking for trouble), so
  LD_LIBRARY_PATH starts with the LIBDIR of the interpreter that made `home/pyenv`, which must be built
  with --enable-shared. The binaries find `nvidia_pytriton.libs/` through their RPATHs as long as the
  wheel's layout is kept (`backends/python/` is as deep as `python_backend_stubs/X.Y/`, so the copied
  stub's `$ORIGIN/../../../../nvidia_pytriton.libs` still resolves); it goes on LD_LIBRARY_PATH anyway;
- the embedded interpreter finds its packages through PATH (it looks for `python3` there, and
  `pyvenv.cfg` next to it makes it the venv), so `home/pyenv/bin` goes first on PATH; PYTHONPATH,
  PYTHONHOME and the user site are kept out so the caller's environment cannot leak in;
- that environment needs numpy < 2: with numpy 2 the stub (built against numpy 1) answers with
  empty outputs (the client then fails with "cannot reshape array of size 0"). The project and
  tritonclient stay on numpy 2 in their own venv;
- the Python backend keeps one shared-memory region per model instance in /dev/shm (prefix + UUID);
  a killed server leaves them behind, so every start gets its own prefix and stop()/kill() remove
  what is left under it;
- the stubs are the server's children in its process group (it runs in a session of its own, so a
  Ctrl-C meant for the caller does not reach it): kill() signals the group and waits until the stubs
  are really gone (SIGKILL is asynchronous; a stub holding torch takes a moment to die);
- gRPC binds with SO_REUSEPORT: a restart on the same port works as soon as the old server is gone
  (stop() returns only then; Triton takes ~2 s to unload the models), but a second server on a port
  still taken would start without complaint and share it - so start() first checks the port with a
  plain bind;
- `--disable-auto-complete-config` keeps the configs exactly as written and saves one stub launch
  (one torch import) per model at start-up;
- the home holds a `*` .gitignore, so git and ruff (which lints the whole checkout and respects
  .gitignore) never look inside - the server ships Python files that are not ours to lint.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("triton_cpu")

REPO = Path(__file__).resolve().parents[1]
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
MAKE_HINT = "run `make triton-cpu` (or: python tools/triton_cpu.py setup --home {home})"


class TritonCpuError(RuntimeError):
    """Something this tool needs failed; the message says what and what to do."""


class NotSetUpError(TritonCpuError):
    """The home is not (or no longer) set up, and setup was told not to install."""


def default_home() -> Path:
    """`$CTL_TRITON_HOME`, or `.triton-cpu` at the root of the checkout."""
    return Path(os.environ.get("CTL_TRITON_HOME") or REPO / ".triton-cpu").resolve()


def _check_shell_safe(path: Path, what: str) -> None:
    """The Python backend starts its stub through `bash -c` with the paths unquoted: a space (or any
    shell character) in the home's or the repository's path leaves the model loading forever."""
    unsafe = sorted({c for c in str(path) if c.isspace() or c in "\"'$`\\;&|<>()*?[]{}"})
    if unsafe:
        raise TritonCpuError(
            f"the {what} {str(path)!r} contains {''.join(unsafe)!r}: Triton's Python backend launches its "
            "stub through `bash -c` without quoting, so it cannot live there; use a path without spaces "
            "or shell characters (for the home: --home or CTL_TRITON_HOME)"
        )


def _python_mm() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _expected_marker(*, this_python: bool = True) -> dict[str, Any]:
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


def setup(home: Path | str | None = None, *, install: bool = True) -> TritonHome:
    """Make HOME a working Triton-on-CPU installation (idempotent; instant when already done).

    With `install=False` nothing is downloaded or installed: a home that is not set up (or was set up
    for another interpreter or other versions) raises NotSetUpError, whose message says what to run.
    """
    home = Path(home).resolve() if home is not None else default_home()
    _check_shell_safe(home, "Triton CPU home")
    found, why = _load_marker(home, this_python=install)
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
        found, _ = _load_marker(home, this_python=True)  # another process may have done it meanwhile
        if found is not None:
            return found
        return _setup_locked(home)


def _ignore_in_git(home: Path) -> None:
    """A `*` .gitignore in the home (as venv does): git, and ruff with it, never look inside, wherever
    the home is - `make test` lints the whole checkout, and the server ships Python files."""
    ignore = home / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# made by tools/triton_cpu.py: nothing here belongs in git\n*\n")


def _load_marker(home: Path, *, this_python: bool) -> tuple[TritonHome | None, str]:
    """The home if its setup.json fits and its files are there, else None and why not."""
    try:
        versions = json.loads((home / MARKER).read_text())
    except FileNotFoundError:
        return None, f"no {MARKER}"
    except (OSError, ValueError) as error:
        return None, f"unreadable {MARKER}: {error}"
    expected = _expected_marker(this_python=this_python)
    differ = [f"{k} {versions.get(k)!r}, expected {v!r}" for k, v in expected.items() if versions.get(k) != v]
    if differ:
        return None, f"set up for other versions: {'; '.join(differ)}"
    found = TritonHome(home, versions)
    missing = found.missing()
    if missing:
        return None, f"missing {', '.join(missing)}"
    return found, ""


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
    wheel = _step("1/4 download the nvidia-pytriton wheel", _download_wheel, home)
    _step("2/4 extract tritonserver, the Python backend and its stub", _extract, wheel, home)
    _step("3/4 install the stub into backends/python", _install_stub, home)
    versions = _step("4/4 create the backend's Python environment (torch, numpy<2)", _make_pyenv, home)
    marker = {
        **_expected_marker(),
        "python_executable": str(Path(sys.executable)),
        "python_libdir": str(libdir),
        "libpython": libpython,
        "stub_python": _python_mm(),
        "pyenv_torch": versions["torch"],
        "pyenv_numpy": versions["numpy"],
        "wheel": wheel.name,
    }
    result = TritonHome(home, marker)
    missing = result.missing()
    if missing:
        raise TritonCpuError(f"setup finished but these are missing: {', '.join(missing)}")
    (home / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    log.info("Triton CPU home ready in %.1f s: %s (%s)", time.monotonic() - started, home, _disk_usage(home))
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
    mm = _python_mm()
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


def _run_logged(cmd: Sequence[str], what: str, hint: str, env: dict[str, str] | None = None) -> None:
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


def _download_wheel(home: Path) -> Path:
    pattern = f"nvidia_pytriton-{PYTRITON_VERSION}-*.whl"
    found = sorted(home.glob(pattern))
    if found:
        log.info("  using %s (already downloaded)", found[0].name)
        return found[0]
    with tempfile.TemporaryDirectory(dir=home, prefix=".download-") as tmp:
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"nvidia-pytriton=={PYTRITON_VERSION}",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-d",
                tmp,
            ],
            "downloading the nvidia-pytriton wheel with pip",
            "pip must reach PyPI or a mirror that has nvidia-pytriton (check the network, pip.conf and "
            f"PIP_INDEX_URL), or put nvidia_pytriton-{PYTRITON_VERSION}-py3-none-manylinux_2_35_x86_64.whl "
            f"into {home} yourself and run setup again.",
        )
        wheels = sorted(Path(tmp).glob(pattern))
        if not wheels:
            raise TritonCpuError(f"pip reported success but left no {pattern} in {tmp}")
        target = home / wheels[0].name
        os.replace(wheels[0], target)
    log.info("  downloaded %s (%.1f MB)", target.name, target.stat().st_size / 1e6)
    return target


def _extract(wheel: Path, home: Path) -> None:
    """Only the server, the Python backend, this interpreter's stub and the libraries they link to."""
    mm = _python_mm()
    target = home / SERVER_DIR
    done = target / ".ctl-done"
    if done.exists() and done.read_text() == f"{wheel.name} {mm}":
        log.info("  already extracted in %s", target)
        return
    staging = Path(tempfile.mkdtemp(dir=home, prefix=".extract-"))
    try:
        try:
            archive = zipfile.ZipFile(wheel)
        except (OSError, zipfile.BadZipFile) as error:
            wheel.unlink(missing_ok=True)
            raise TritonCpuError(
                f"{wheel} is not a readable wheel ({error}); deleted it: run setup again"
            ) from error
        with archive:
            members = {info.filename: info for info in archive.infolist() if not info.is_dir()}
            wanted = [
                f"{TRITON_ROOT}/bin/tritonserver",
                *(n for n in members if n.startswith(f"{TRITON_ROOT}/backends/python/")),
                f"{TRITON_ROOT}/python_backend_stubs/{mm}/{STUB}",
            ]
            absent = [n for n in wanted if n not in members]
            if absent:
                raise TritonCpuError(f"{wheel.name} lacks {', '.join(absent)}: not the wheel this tool knows")
            libs = {n.rsplit("/", 1)[1]: n for n in members if n.startswith(f"{LIBS_DIR}/")}
            # The libraries they need: the libs' names (mangled by auditwheel, so unique) found in
            # the files already taken, until nothing new turns up. Skips e.g. the bundled
            # libpython 3.13, which only the 3.13 stub uses.
            taken: list[str] = []
            todo = list(wanted)
            while todo:
                name = todo.pop()
                taken.append(name)
                data = archive.read(members[name])
                for lib, member in libs.items():
                    if member not in taken and member not in todo and lib.encode() in data:
                        todo.append(member)
            for name in taken:
                info = members[name]
                path = archive.extract(info, staging)
                os.chmod(path, ((info.external_attr >> 16) & 0o777) or 0o644)
        for name in (f"{TRITON_ROOT}/bin/tritonserver", f"{TRITON_ROOT}/python_backend_stubs/{mm}/{STUB}"):
            os.chmod(staging / name, 0o755)  # zip members do not always keep their execute bits
        (staging / done.name).write_text(f"{wheel.name} {mm}")
        os.chmod(staging, 0o755)  # mkdtemp made it private
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        log.info("  %d files, %s", len(taken), _disk_usage(target))
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _install_stub(home: Path) -> None:
    th = TritonHome(home)
    source = th.root / "python_backend_stubs" / _python_mm() / STUB
    shutil.copy2(source, th.stub)
    os.chmod(th.stub, 0o755)
    log.info("  %s (for Python %s)", th.stub, _python_mm())


def _make_pyenv(home: Path) -> dict[str, str]:
    pyenv = home / PYENV
    python = pyenv / "bin" / "python"
    done = pyenv / ".ctl-done"
    want = f"{sys.version.split()[0]} torch=={TORCH_VERSION} {NUMPY_SPEC}"
    if not (done.exists() and done.read_text() == want):
        if pyenv.exists():
            log.info("  removing the old %s", pyenv)
            shutil.rmtree(pyenv)
        _run_logged(
            [sys.executable, "-m", "venv", str(pyenv)],
            f"creating the venv {pyenv} with {sys.executable}",
            "the interpreter needs its venv and ensurepip modules (Debian: apt-get install python3-venv).",
        )
        log.info(
            "  installing torch==%s and %s into %s (a minute or two) ...", TORCH_VERSION, NUMPY_SPEC, pyenv
        )
        _run_logged(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                f"torch=={TORCH_VERSION}",
                NUMPY_SPEC,
            ],
            f"installing torch=={TORCH_VERSION} and {NUMPY_SPEC} into {pyenv}",
            "pip must reach PyPI or a mirror with these (check the network, pip.conf, PIP_INDEX_URL; for "
            "the CPU build of torch: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu); then run "
            "setup again.",
        )
        done.write_text(want)
    probe = subprocess.run(
        [str(python), "-I", "-c",
         "import json, sys, numpy, torch; print(json.dumps({'python': sys.version.split()[0], "
         "'torch': torch.__version__, 'numpy': numpy.__version__}))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        done.unlink(missing_ok=True)
        raise TritonCpuError(
            f"{python} cannot import torch and numpy:\n{probe.stderr[-2000:]}\nrun setup again"
        )
    versions = json.loads(probe.stdout.strip().splitlines()[-1])
    problems = []
    if versions["python"] != sys.version.split()[0]:
        problems.append(f"Python {versions['python']} (expected {sys.version.split()[0]})")
    if not versions["torch"].startswith(TORCH_VERSION):
        problems.append(f"torch {versions['torch']} (expected {TORCH_VERSION})")
    if int(versions["numpy"].split(".")[0]) >= 2:
        problems.append(f"numpy {versions['numpy']} (the stub needs numpy < 2)")
    if problems:
        done.unlink(missing_ok=True)
        raise TritonCpuError(f"{pyenv} has {', '.join(problems)}: delete it and run setup again")
    log.info(
        "  %s: Python %s, torch %s, numpy %s", pyenv, versions["python"], versions["torch"], versions["numpy"]
    )
    return versions


def _disk_usage(path: Path) -> str:
    total = sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())
    return f"{total / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------- twin

MODEL_PY = '''\
"""CPU twin of an exported pytorch_libtorch model, generated by tools/triton_cpu.py: runs the exported
TorchScript file (parameter torchscript_path) on each batch the dynamic batcher forms."""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        self.module = torch.jit.load(params["torchscript_path"], map_location="cpu").eval()
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [
            (spec["name"], pb_utils.triton_string_to_numpy(spec["data_type"])) for spec in config["output"]
        ]

    def execute(self, requests):
        try:
            sizes = []
            columns = [[] for _ in self.inputs]
            for request in requests:
                for column, name in zip(columns, self.inputs):
                    column.append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
                sizes.append(columns[0][-1].shape[0])
            batch = [torch.from_numpy(np.concatenate(column)) for column in columns]
            with torch.inference_mode():
                result = self.module(*batch)
            if isinstance(result, torch.Tensor):
                result = (result,)
            if len(result) != len(self.outputs):
                raise RuntimeError(f"{len(result)} outputs from the model, {len(self.outputs)} in the config")
            arrays = [t.contiguous().numpy() for t in result]
        except Exception as error:  # one error response per request, as the libtorch backend does
            message = f"{type(error).__name__}: {error}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(array[start : start + size], dtype=dtype))
                for (name, dtype), array in zip(self.outputs, arrays)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.module = None
'''


def _model_dirs(repo: Path) -> list[Path]:
    return sorted(p.parent for p in repo.glob("*/config.pbtxt"))


def write_twin(exported_repo: Path | str, out: Path | str, *, torch_threads: int | None = None) -> Path:
    """Write the CPU twin of an exported repository to OUT (created; existing models are replaced).

    Each model keeps its config (name, tensors, dims, max_batch_size, dynamic batching, parameters)
    with `backend: "python"` instead of its platform, KIND_CPU instances, and the parameters
    `torchscript_path` (absolute path of the exported model.pt of the version Triton would serve: the
    highest) and `torch_threads` (default: the cores shared by the instances, at most 2).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    exported_repo, out = Path(exported_repo).resolve(), Path(out)
    models = _model_dirs(exported_repo)
    if not models:
        raise TritonCpuError(f"{exported_repo} holds no */config.pbtxt: not a Triton model repository")
    out.mkdir(parents=True, exist_ok=True)
    for model_dir in models:
        config = model_config_pb2.ModelConfig()
        text_format.Parse((model_dir / "config.pbtxt").read_text(), config)
        filename = config.default_model_filename or "model.pt"
        versions = sorted(
            (int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / filename).is_file()),
            reverse=True,
        )
        if not versions:
            raise TritonCpuError(f"{model_dir} has no <version>/{filename}")
        version = versions[0]
        config.ClearField("platform")
        config.ClearField("default_model_filename")
        config.backend = "python"
        if not config.instance_group:
            config.instance_group.add(count=1)
        instances = 0
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
            group.ClearField("gpus")
            instances += group.count or 1
        threads = torch_threads or max(1, min(2, (os.cpu_count() or 1) // instances))
        config.parameters["torchscript_path"].string_value = str(model_dir / str(version) / filename)
        config.parameters["torch_threads"].string_value = str(threads)
        target = out / model_dir.name
        if target.exists():
            shutil.rmtree(target)
        (target / str(version)).mkdir(parents=True)
        (target / "config.pbtxt").write_text(text_format.MessageToString(config))
        (target / str(version) / "model.py").write_text(MODEL_PY)
        log.info(
            "twin %s: version %d runs %s (%d thread(s))",
            model_dir.name,
            version,
            model_dir / str(version) / filename,
            threads,
        )
    info = exported_repo / "model_info.json"
    if info.exists():
        shutil.copy2(info, out / info.name)
    return out


# --------------------------------------------------------------------------------------------- start


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_port_free(address: str, port: int, what: str) -> None:
    """gRPC listens with SO_REUSEPORT, so a second Triton on a taken port starts "fine" and the kernel
    shares the connections between the two. A bind without SO_REUSEPORT tells the truth first."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            sock.bind((address, port))
        except OSError as error:
            raise TritonCpuError(
                f"the {what} port {address}:{port} is taken ({error.strerror}): another Triton still "
                "running? Stop it, or pick another port (0: any free one)"
            ) from error


class TritonProcess:
    """A running tritonserver (its own process group: the Python backend's stubs are its children)."""

    def __init__(
        self,
        proc: subprocess.Popen,
        *,
        address: str,
        grpc_port: int,
        model_repo: Path,
        log_path: Path | None,
        shm_prefix: str,
        log_file: Any = None,
    ):
        self.proc = proc
        self.address = address
        self.grpc_port = grpc_port
        self.model_repo = model_repo
        self.log_path = log_path
        self.shm_prefix = shm_prefix
        self._log_file = log_file
        host = "127.0.0.1" if address in ("0.0.0.0", "") else address
        self.grpc_url = f"{host}:{grpc_port}"
        self.models = [p.name for p in _model_dirs(model_repo)]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.exit_status() is None

    def exit_status(self) -> int | None:
        """The exit status (-N: killed by signal N) once the server has exited, else None. Does not
        reap it: until stop()/kill()/wait() do, its pid - the id of its process group - stays ours."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            state = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll()
        if state is None:
            return None
        killed = state.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
        return -state.si_status if killed else state.si_status

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(Triton's output went to the console)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = 120.0) -> TritonProcess:
        """Wait until the server and each model of the repository are ready (over gRPC).

        On failure (the server exited, or the time is up) the server is killed and TritonCpuError
        says why, with the end of its log."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + timeout
        not_ready: list[str] = ["server"]
        with grpcclient.InferenceServerClient(self.grpc_url) as client:
            while time.monotonic() < deadline:
                status = self.exit_status()
                if status is not None:
                    self._finish(0)
                    raise TritonCpuError(
                        f"tritonserver exited with status {status} before it was ready "
                        f"(log: {self.log_path}):\n{self.log_tail()}"
                    )
                try:
                    if client.is_server_ready(client_timeout=2):
                        not_ready = [m for m in self.models if not client.is_model_ready(m, client_timeout=2)]
                        if not not_ready:
                            return self
                except InferenceServerException:
                    pass
                time.sleep(0.2)
        self.kill()
        raise TritonCpuError(
            f"Triton at {self.grpc_url} not ready after {timeout:.0f} s (waiting for {', '.join(not_ready)}; "
            f"log: {self.log_path}):\n{self.log_tail()}"
        )

    def wait(self) -> int:
        """Block until the server exits by itself; its exit status (stubs left behind are killed)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)  # no reaping: see _finish
        return self._finish(0)

    def stop(self, timeout: float = 30.0) -> int:
        """Graceful shutdown (SIGTERM: Triton unloads the models and ends their stubs); kill() if it hangs.
        Returns once the server and its stubs are gone, with the server's exit status."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
        return self._finish(timeout)

    def kill(self) -> int:
        """SIGKILL to the whole process group: the server and its stubs."""
        self._signal_group(signal.SIGKILL)
        return self._finish(10.0)

    def _finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        # Wait for the exit without reaping: while the server is an unreaped zombie its pid (the
        # group's id) cannot be reused, so the group can be signalled safely afterwards.
        while self.proc.returncode is None:
            try:
                state = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if state is not None:
                break
            if time.monotonic() > deadline:
                log.warning("tritonserver %d did not stop within %.0f s: killing it", self.proc.pid, timeout)
                self._signal_group(signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.05)
        self._signal_group(signal.SIGKILL)  # stubs left behind, if any
        settle = time.monotonic() + 10  # SIGKILL is asynchronous: let a big stub finish dying
        while self.proc.returncode is None and self.group_members() and time.monotonic() < settle:
            time.sleep(0.02)
        code = self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        return code

    def group_members(self) -> list[int]:
        """Live (not zombie) processes of the server's process group: the server and its stubs."""
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == self.proc.pid:
                members.append(int(stat.parent.name))
        return members

    def _signal_group(self, sig: int) -> None:
        if self.proc.returncode is not None:
            return  # reaped: the group id may belong to someone else now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def __enter__(self) -> TritonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    home: TritonHome | Path | str,
    model_repo: Path | str,
    *,
    grpc_port: int = 0,
    log_path: Path | str | None = None,
    address: str = "127.0.0.1",
    http_port: int | None = None,
    metrics_port: int | None = None,
    extra_args: Sequence[str] = (),
) -> TritonProcess:
    """Start tritonserver on MODEL_REPO (a twin: see write_twin). Returns at once; call wait_ready().

    grpc_port 0 picks a free port. HTTP and metrics are off unless their ports are given. The output
    goes to LOG_PATH, or to this process's stdout/stderr when None.
    """
    if not isinstance(home, TritonHome):
        home = setup(home, install=False)
    model_repo = Path(model_repo).resolve()
    _check_shell_safe(model_repo, "model repository")
    if not _model_dirs(model_repo):
        raise TritonCpuError(f"{model_repo} holds no */config.pbtxt")
    port = grpc_port or free_port(address if address != "0.0.0.0" else "127.0.0.1")
    for what, number in (("gRPC", port), ("HTTP", http_port), ("metrics", metrics_port)):
        if number:
            _check_port_free(address, number, what)
    shm_prefix = f"ctl_triton_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
    cmd = [
        str(home.server),
        f"--model-repository={model_repo}",
        f"--backend-directory={home.backends}",
        "--allow-grpc=true",
        f"--grpc-address={address}",
        f"--grpc-port={port}",
        f"--allow-http={'true' if http_port is not None else 'false'}",
        f"--allow-metrics={'true' if metrics_port is not None else 'false'}",
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--exit-timeout-secs=10",
        "--pinned-memory-pool-byte-size=0",  # no CUDA here: skip the pinned pool (and its warning)
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        "--log-verbose=0",
    ]
    if http_port is not None:
        cmd += [f"--http-address={address}", f"--http-port={http_port}"]
    if metrics_port is not None:
        cmd += [f"--metrics-address={address}", f"--metrics-port={metrics_port}", "--allow-gpu-metrics=false"]
    cmd += list(extra_args)
    log_file = None
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = log_path.open("ab")
    log.info("starting tritonserver on %s:%d (repository %s)", address, port, model_repo)
    log.debug("$ %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(
            cmd,
            env=home.environment(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file is not None else None,
            start_new_session=True,  # its own group: Ctrl-C goes to us, and kill() reaches the stubs
            cwd=home.home,
        )
    except OSError as error:
        if log_file is not None:
            log_file.close()
        raise TritonCpuError(
            f"cannot run {home.server}: {error}. " + MAKE_HINT.format(home=home.home)
        ) from error
    return TritonProcess(
        proc,
        address=address,
        grpc_port=port,
        model_repo=model_repo,
        log_path=log_path,
        shm_prefix=shm_prefix,
        log_file=log_file,
    )


# ----------------------------------------------------------------------------------------------- CLI


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    home = setup(args.home, install=False)
    # Triton runs in its own process group: stop it on Ctrl-C (even where the shell started us with
    # SIGINT ignored, as background jobs are), on SIGTERM and when the terminal goes away.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    with tempfile.TemporaryDirectory(prefix="ctl-triton-twin-") as tmp:
        twin = write_twin(args.repo, Path(tmp) / "repo")
        server = start(
            home,
            twin,
            grpc_port=args.grpc_port,
            address=args.address,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
        )
        try:
            server.wait_ready(args.timeout)
            models = ", ".join(server.models)
            print(f"Triton {TRITONSERVER_VERSION} ready: gRPC {server.grpc_url}, models {models}")
            print("Ctrl-C stops it.")
            sys.stdout.flush()
            code = server.wait()
            print(f"tritonserver exited by itself with status {code}", file=sys.stderr)
            return code or 1
        except KeyboardInterrupt:
            print("stopping Triton ...")
            return 0
        finally:
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/triton_cpu.py",
        description="Triton (from the nvidia-pytriton wheel) on this CPU, serving exported encoders.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the output of pip")
    sub = parser.add_subparsers(dest="command", required=True)
    home_help = "Triton home (default: $CTL_TRITON_HOME or <checkout>/.triton-cpu)"
    p_setup = sub.add_parser(
        "setup", help="download and install Triton and its Python environment (idempotent)"
    )
    p_setup.add_argument("--home", type=Path, default=None, help=home_help)
    p_twin = sub.add_parser("twin", help="write the CPU twin of an exported repository")
    p_twin.add_argument("--repo", type=Path, required=True, help="repository written by `ctl export`")
    p_twin.add_argument("--out", type=Path, required=True)
    p_serve = sub.add_parser("serve", help="serve an exported repository (as its CPU twin) until Ctrl-C")
    p_serve.add_argument("--repo", type=Path, required=True, help="repository written by `ctl export`")
    p_serve.add_argument("--home", type=Path, default=None, help=home_help)
    p_serve.add_argument("--grpc-port", type=int, default=8001)
    p_serve.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0: all interfaces)")
    p_serve.add_argument("--http-port", type=int, default=None, help="also serve HTTP on this port")
    p_serve.add_argument("--metrics-port", type=int, default=None, help="also serve metrics on this port")
    p_serve.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        if args.command == "setup":
            home = setup(args.home)
            print(f"Triton CPU home: {home.home}")
        elif args.command == "twin":
            print(write_twin(args.repo, args.out))
        else:
            return _serve(args)
    except TritonCpuError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
