"""One server's life, the same for the encoder, the ranker, the local stack and the tests.

A service subclasses `Service`: its constructor (run on the event loop that will serve it) builds the bound
gRPC server (`ctl.serving.build_server`) and what the service owns; `bring_up` waits for its dependencies and
turns health SERVING; `close` releases what it owns once the gRPC server has stopped. Then:

- `run` is a command's life (`ctl serve-*`): the /metrics endpoint, the gRPC port open at once with health
  NOT_SERVING, `bring_up`, serve until SIGTERM/SIGINT (or `stop`). SIGTERM while `bring_up` still waits for
  a dependency stops at once: the pod is told to go, and must not wait for SIGKILL.
- `start` / `stop` are for a caller that owns the life itself (the local stack, tests): `start` returns
  once SERVING (stopping again if it cannot come up), `stop` drains.

Draining is written once (`stop`): NOT_SERVING, no probe may turn it SERVING again, in-flight calls get the
grace period, the service's background tasks end, then `close`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import grpc

from ctl.security import Tokens, server_credentials, token_auth, warn_unauthenticated
from ctl.server_settings import ServerSettings
from ctl.serving import ListenError, Metrics, Server, build_server, host_port
from ctl.settings import named

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def build_service_server(
    config: ServerSettings,
    *,
    service_name: str,
    add_servicer: Callable[[grpc.aio.Server], None],
    metrics: Metrics,
    scopes: Mapping[str, Tokens],
    method_scopes: Mapping[str, str] | None = None,
) -> Server:
    """A service's bound gRPC server, built the same way for every service: its servicer, health and
    reflection, metrics, the concurrency limit, token scopes (`method_scopes`: method name -> scope; a
    service with one scope needs none) and TLS from `config`. A server without tokens says so once it
    listens (`warn_unauthenticated`)."""
    auth = token_auth(scopes, method_scopes or {}, protect_open=config.protect_health)
    server = build_server(
        service_names=(service_name,),
        add_servicers=add_servicer,
        address=host_port(config.host, config.port),
        metrics=metrics,
        max_message_bytes=config.max_message_bytes,
        max_concurrent_calls=config.max_concurrent_calls,
        auth=auth,
        credentials=server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca),
        health_address=host_port(config.host, config.health_port) if config.health_port >= 0 else None,
    )
    if auth is None:
        server.notices.append(
            functools.partial(warn_unauthenticated, scopes, service=service_name, host=config.host)
        )
    return server


class Service(abc.ABC):
    """A built (not started) server and what it owns; see the module's docstring."""

    def __init__(self, server: Server, config: ServerSettings):
        """`config.grace_s`: what in-flight calls get when stopped; `config.host`, `config.metrics_port`
        (-1: off): where `run` serves /metrics."""
        self.server = server
        self.metrics = server.metrics
        self.grace_s = config.grace_s
        self._metrics_host = config.host
        self._metrics_port = config.metrics_port
        self._tasks: list[asyncio.Task] = []

    @property
    def port(self) -> int:
        """The gRPC port (the one picked when the config said 0)."""
        return self.server.port

    @abc.abstractmethod
    async def bring_up(self) -> None:
        """Waits for the dependencies, then turns health SERVING (`self.server.set_serving(True)`)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases what the service owns, after the gRPC server stopped and its background tasks ended."""

    def keep(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Runs `coro` (a health watcher) until the service stops."""
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def start(self) -> None:
        """Serving in the caller's life: the port open (NOT_SERVING), then `bring_up`; stops again (no
        grace: nothing was served) if it raises."""
        await self.server.begin()
        await self.server.start()
        try:
            await self.bring_up()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def stop(self, grace: float | None = None) -> None:
        """Drains: NOT_SERVING for good, in-flight calls get `grace` (default `grace_s`) seconds, the
        background tasks end, then `close`."""
        await self.server.set_serving(False)
        await self.server.health.enter_graceful_shutdown()  # a health probe may no longer turn it SERVING
        await self.server.stop(self.grace_s if grace is None else grace)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.close()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """A command's life: serves until SIGTERM/SIGINT or `stop`, then drains. Raises what `bring_up`
        raises (a dependency that never came up), after draining."""
        stop = stop or asyncio.Event()
        if self._metrics_port >= 0:
            port = self.metrics.serve_http(self._metrics_host.strip("[]"), self._metrics_port)
            log.info("metrics on http://%s:%d/metrics", self._metrics_host, port)
        loop = asyncio.get_running_loop()
        try:
            # grpc's health servicer starts with "" SERVING: NOT_SERVING until bring_up has succeeded
            await self.server.begin()
            for sig in STOP_SIGNALS:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
            await self.server.start()
            try:
                if not await _unless_stopped(self.bring_up(), stop):
                    log.info("stopped while starting (waiting for dependencies)")
                await stop.wait()
                log.info("shutting down: NOT_SERVING, %.1f s for in-flight calls", self.grace_s)
            finally:
                await self.stop()
                log.info("stopped")
        finally:
            for sig in STOP_SIGNALS:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            await asyncio.to_thread(self.metrics.stop_http)  # joins the HTTP thread (up to 0.5 s)


def serve_command(
    what: str,
    make_config: Callable[[], Any],
    run: Callable[[Any], Awaitable[None]],
    *,
    config_error: type[Exception],
    service_error: type[Exception],
    env_prefix: str,
    logger: logging.Logger = log,
) -> int:
    """`ctl serve-*`: builds the config and runs the service until SIGTERM/SIGINT. Exit 0 after a clean
    stop; 2 for a bad setting (one line naming the flag or variable) or an unusable TLS file or token
    setting; 1 when it cannot start or stops on an error (a port taken, a dependency that never came).
    `logger`: the command's, so that its lines keep the name log filters know."""
    from ctl.security import SecurityConfigError

    try:
        config = make_config()
    except config_error as exc:
        logger.error("%s", exc)
        return 2
    try:
        asyncio.run(run(config))
    except SecurityConfigError as exc:
        logger.error("%s cannot start: %s", what, exc)
        return 2
    except ListenError as exc:  # a port in use, or a host not this machine's
        logger.error("%s cannot start: %s", what, exc.naming(named(env_prefix, exc.setting)))
        return 1
    except (service_error, OSError) as exc:
        logger.error("%s stopped: %s", what, exc)
        return 1
    return 0


async def _unless_stopped(start: Awaitable[None], stop: asyncio.Event) -> bool:
    """Runs `start` unless `stop` is set first; False when it was stopped. `start`'s error is raised."""
    starting = asyncio.ensure_future(start)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    if starting.cancelled():
        return False
    starting.result()
    return True


async def wait_for_signal() -> None:
    """Returns on SIGTERM or SIGINT (`ctl demo --keep-running`: the caller then stops its services)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
