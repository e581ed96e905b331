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
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctl.v1 import encoder_pb2_grpc
from encoder_service.config import EncoderConfig
from encoder_service.errors import BackendUnavailable
from encoder_service.server import Encoder as EncoderService

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
            [sys.executable, "-m", "ctl_app.cli", *args],
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


# ---- an encoder server run in the test process (encoder_service.server.Encoder.run on a LoopThread)

SERVING = health_pb2.HealthCheckResponse.SERVING


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


async def _built(config: EncoderConfig, health_poll_s: float) -> EncoderService:
    """The encoder service, built on the loop that will serve it."""
    return EncoderService(config, health_poll_s=health_poll_s)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


class Encoder:
    """A running encoder server (`run` on the loop thread, as `ctl serve-encoder` runs it) and a channel
    to it; `server` is its gRPC server (ctl.serving.Server), `app` its EncoderApp."""

    def __init__(self, loop: LoopThread, config: EncoderConfig, health_poll_s: float = 5.0):
        self.loop = loop
        self.service = loop.call(_built(config, health_poll_s))
        self.server, self.app = self.service.server, self.service.app
        self._stop = loop.call(_new_event())
        self.task = loop.submit(self.service.run(self._stop))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str = "") -> int:
        """The health status, once the server answers at all."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
            except grpc.RpcError:
                if time.monotonic() > deadline or self.task.done():
                    raise
                time.sleep(0.01)

    def wait_serving(self) -> Encoder:
        wait_until(lambda: self.task.done() or self.status() == SERVING, timeout=20)
        if self.task.done():
            self.task.result()  # raises why it did not start
        return self

    def request_stop(self) -> None:
        self.loop.loop.call_soon_threadsafe(self._stop.set)

    def close(self) -> None:
        if not self.task.done():
            self.request_stop()
        try:
            self.task.result(30)
        except BackendUnavailable:
            pass  # a test expected it
        self.channel.close()


def encoder_config(repo: Path, **overrides: Any) -> EncoderConfig:
    settings: dict[str, Any] = {"model_repo": repo, "host": "127.0.0.1", "port": 0, "metrics_port": -1}
    return EncoderConfig(**{**settings, **overrides})


# ---- a proxy that stalls a client at a known call (the kill tests)


class HoldingProxy:
    """A gRPC proxy on loopback (served on a LoopThread) that forwards every unary or client-streaming call
    to `target` as it is (bytes in, bytes out, statuses passed back), except that the calls of `method`
    after its first `passes` wait until `release()`. It stalls a client or a server at a known point (the
    4th UpsertProducts stream; a ranker's 4th EncodeProducts call) however fast the machine is, so that a
    test can kill something there without a race. (Image files can no longer stall a job: `ctl ingest`
    refuses named pipes.)"""

    def __init__(self, loop: LoopThread, target: str, method: str, passes: int):
        self.loop, self.target, self.method, self.passes = loop, target, method, passes
        self.calls = 0  # of `method`, held or not
        self.server, self.channel, self._released, port = loop.call(self._start())
        self.address = f"127.0.0.1:{port}"

    async def _start(self):
        channel = grpc.aio.insecure_channel(self.target)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([_Forward(self)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, channel, asyncio.Event(), port

    async def gate(self, method: str) -> None:
        if method == self.method:
            self.calls += 1
            if self.calls > self.passes:
                await self._released.wait()

    def release(self) -> None:
        self.loop.loop.call_soon_threadsafe(self._released.set)

    def close(self) -> None:
        self.release()
        self.loop.call(self.server.stop(0))
        self.loop.call(self.channel.close())


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: HoldingProxy):
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method, proxy = details.method, self.proxy
        name = method.lstrip("/").replace("/", ".")
        streaming = descriptor_pool.Default().FindMethodByName(name).client_streaming

        async def forward(request, context):
            await proxy.gate(method)
            call = (proxy.channel.stream_unary if streaming else proxy.channel.unary_unary)(method)
            try:
                return await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details())

        if streaming:
            return grpc.stream_unary_rpc_method_handler(forward)
        return grpc.unary_unary_rpc_method_handler(forward)
