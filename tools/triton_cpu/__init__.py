"""A real Triton Inference Server on this CPU, serving the exported encoders (tests and developers).

Why. `ctl export` writes a Triton model repository for the GPU: `pytorch_libtorch`, KIND_GPU instances
(DESIGN.md §2). Triton ships as NGC containers, which a machine without a GPU or Docker cannot use; the
only Triton on PyPI is the one bundled in NVIDIA's PyTriton wheel: `nvidia-pytriton==0.7.0` carries the
`tritonserver` 2.51 binary with the Python backend and no libtorch backend (a `pytorch_libtorch` model
fails with "unable to find backend library for backend 'pytorch'"). So the server is real - the same
gRPC API, model configuration, dynamic batcher and statistics as in production - and only the backend
differs: the tests serve a CPU *twin* of the exported repository, whose Python-backend `model.py` runs
the very same exported `model.pt`.

What each module does:
- `install.setup(home)` (idempotent; `home/setup.json` records the versions, a second run returns at once):
  `wheel` downloads `nvidia-pytriton==0.7.0` (`pip download --no-deps`, 55 MB, only when missing),
  extracts only the server, its Python backend, this interpreter's stub and the libraries they link to,
  and puts the stub into `backends/python/`; `pyenv` creates `home/pyenv`, a venv of this interpreter
  (no system site packages) with `torch==2.13.0` and `numpy<2`. `home` says where all that lives and
  the environment the server needs; `setup(..., install=False)` only finds a set-up home.
- `twin.write_twin(exported_repo, out)`: for every model of the exported repository, the same config.pbtxt
  with `backend: "python"` instead of `platform`, KIND_CPU instances and a `torchscript_path` parameter
  holding the absolute path of the exported `model.pt`; plus `<version>/model.py`, a copy of
  `twin_model.py`, which `torch.jit.load`s that file and runs each batch Triton forms.
- `server.start(home, repo)`: run `tritonserver` on the twin with the environment the stub needs;
  `TritonProcess.wait_ready()` waits for the server and every model over gRPC, `stop()`/`kill()` end it
  and its stubs.
- `python -m tools.triton_cpu setup | twin | serve`: the command line (`__main__`; `make triton-cpu`).
"""

from tools.triton_cpu.install import setup
from tools.triton_cpu.server import start
from tools.triton_cpu.twin import write_twin

# bench/encoder.py calls these three through the package; everything else imports the module that holds it
__all__ = ["setup", "start", "write_twin"]
