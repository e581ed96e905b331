"""The Python environment of the backend's stub: a venv of this interpreter with torch and numpy < 2.

numpy < 2: with numpy 2 the stub (built against numpy 1) answers with empty outputs (the client then
fails with "cannot reshape array of size 0"). The project and tritonclient stay on numpy 2 in their own
venv.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from tools.triton_cpu.errors import TritonCpuError
from tools.triton_cpu.home import NUMPY_SPEC, PYENV, TORCH_VERSION
from tools.triton_cpu.shell import run_logged

log = logging.getLogger(__name__)


def make_pyenv(home: Path) -> dict[str, str]:
    pyenv = home / PYENV
    python = pyenv / "bin" / "python"
    done = pyenv / ".ctl-done"
    want = f"{sys.version.split()[0]} torch=={TORCH_VERSION} {NUMPY_SPEC}"
    if not (done.exists() and done.read_text() == want):
        if pyenv.exists():
            log.info("  removing the old %s", pyenv)
            shutil.rmtree(pyenv)
        run_logged(
            [sys.executable, "-m", "venv", str(pyenv)],
            f"creating the venv {pyenv} with {sys.executable}",
            "the interpreter needs its venv and ensurepip modules (Debian: apt-get install python3-venv).",
        )
        log.info(
            "  installing torch==%s and %s into %s (a minute or two) ...", TORCH_VERSION, NUMPY_SPEC, pyenv
        )
        run_logged(
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
