"""Real servers for the tests: a `ctl serve-*` subprocess on a free port, and an asyncio loop thread
for servers run inside the test process (so a test can stop and restart them)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
PORT_LINE = re.compile(r"listening on port (\d+)")


class LoopThread:
    """An event loop on a daemon thread: servers live there, tests stay synchronous."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine, timeout: float = 60) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Process:
    """`ctl ARGS` in a subprocess; the port is read from its "listening on port N" log line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
        self.log = (
            Path(os.environ.get("TMPDIR", "/tmp")) / f"ctl-test-{os.getpid()}-{time.monotonic_ns()}.log"
        )
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctl.cli", *args],
            cwd=REPO,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.port = self._wait_for_port(timeout)
        self.address = f"localhost:{self.port}"

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = PORT_LINE.search(self.log.read_text())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctl exited with {self.proc.returncode}:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"no port after {timeout} s:\n{self.log.read_text()}")

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, kill: bool = False) -> int:
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def health(address: str, service: str = "", timeout: float = 2) -> int:
    """The health status (health_pb2.HealthCheckResponse.*) of a server; -1 if it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return -1
        return reply.status


def wait_serving(address: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(address) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout} s")
