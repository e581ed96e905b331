"""Run tritonserver on a twin repository and stop it cleanly.

Pitfalls this encodes (found on this machine):
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
  (one torch import) per model at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.triton_cpu.errors import TritonCpuError
from tools.triton_cpu.home import MAKE_HINT, TritonHome, check_shell_safe
from tools.triton_cpu.install import setup
from tools.triton_cpu.twin import model_dirs

log = logging.getLogger(__name__)


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
        self.models = [p.name for p in model_dirs(model_repo)]

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
    """Start tritonserver on MODEL_REPO (a twin: see `twin.write_twin`). Returns at once; call wait_ready().

    grpc_port 0 picks a free port. HTTP and metrics are off unless their ports are given. The output
    goes to LOG_PATH, or to this process's stdout/stderr when None.
    """
    if not isinstance(home, TritonHome):
        home = setup(home, install=False)
    model_repo = Path(model_repo).resolve()
    check_shell_safe(model_repo, "model repository")
    if not model_dirs(model_repo):
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
