"""What both gRPC servers share: server construction, health, reflection, metrics, errors.

Each service builds its servicer and calls `build_server`; its life (start, serve, drain on SIGTERM) is
`ctl.lifecycle.Service`. Metrics are Prometheus, one registry per server (so several servers can share a
process, as they do in tests and in `ctl demo`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

LIVENESS = "liveness"  # the health service name that only says the process is up

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)

ErrorTable = Mapping[type[BaseException], grpc.StatusCode]


class ListenError(OSError):
    """A server cannot listen on its address: the port is in use, or the host is not this machine's.
    `setting` is the config field of the port (`port`, `health_port`, `metrics_port`), so that the command
    can name its flag and variable (`naming`)."""

    def __init__(self, address: str, setting: str, reason: str):
        super().__init__(f"cannot listen on {address} ({setting}): {reason}")
        self.address, self.setting, self.reason = address, setting, reason

    def naming(self, source: str) -> str:
        """The one line a command logs, with where the port came from (`--port / CTL_RANKER_PORT`)."""
        return f"cannot listen on {self.address} ({source}): {self.reason}"


def host_port(host: str, port: int) -> str:
    """host:port, an IPv6 host in brackets (grpc's and the logs' form)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# What grpc says when a bind fails: only that it failed (its C core logs the reason on stderr).
_GRPC_BIND_FAILED = "the address is in use or not available"
_SURELY_NOT = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)


def _cannot_bind(address: str) -> str | None:
    """Why no socket can be bound to `address` (host:port) now, when that is sure: every address the host
    resolves to is in use or not this machine's (the errno's text). None when one binds, or when the answer
    is not sure (an unusual host or errno): grpc then decides. Asked before grpc binds, so that a port in use
    is one line from us rather than a line from grpc's C core on stderr and a RuntimeError; the sockets
    set SO_REUSEADDR and not SO_REUSEPORT, as grpc's do here."""
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
        infos = socket.getaddrinfo(
            host.strip("[]") or None, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (ValueError, OSError):
        return None
    if number == 0:
        return None
    reasons = []
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno not in _SURELY_NOT:
                return None
            reasons.append(os_reason(exc))
            continue
        return None
    return reasons[0] if reasons else None


def os_reason(exc: OSError) -> str:
    """An OSError's reason in the logs' words: `address already in use`."""
    return (exc.strerror or str(exc)).lower()


def _bind(
    server: grpc.aio.Server, address: str, setting: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds `server` to `address`; a ListenError naming `setting` when it cannot (never grpc's
    RuntimeError and traceback)."""
    reason = _cannot_bind(address)
    if reason is not None:
        raise ListenError(address, setting, reason)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise ListenError(address, setting, _GRPC_BIND_FAILED) from exc
    if port == 0:  # older grpc versions answered 0 instead of raising
        raise ListenError(address, setting, _GRPC_BIND_FAILED)
    return port


class Metrics:
    """The Prometheus metrics of one server; services add their own to `registry`."""

    def __init__(self, service: str):
        self.registry = CollectorRegistry()
        self.service = service
        self.requests = Counter(
            "ctl_grpc_requests",
            "gRPC calls handled, by method and status code",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self._http: Any = None
        self.latency = Histogram(
            "ctl_grpc_request_seconds",
            "gRPC call latency, by method and status code",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def histogram(self, name: str, doc: str, labels: Iterable[str] = (), buckets=SIZE_BUCKETS) -> Histogram:
        return Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry)

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(self.service, method, code.name).inc()
        self.latency.labels(self.service, method, code.name).observe(seconds)

    def serve_http(self, host: str, port: int) -> int:
        """Starts the /metrics endpoint on a daemon thread; returns the bound port (port 0 picks one).
        Raises ListenError (setting `metrics_port`) when it cannot listen."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ListenError(host_port(host, port), "metrics_port", os_reason(exc)) from exc
        return self._http.server_port

    @property
    def http_port(self) -> int | None:
        """The /metrics port while the endpoint runs (to find an ephemeral one)."""
        return None if self._http is None else self._http.server_port

    def stop_http(self) -> None:
        """Closes the /metrics endpoint, if started (so a stopped server frees its port)."""
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()


def rewrap(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    """The same method handler with its behaviour replaced by `wrap(behaviour)` (for interceptors)."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **kwargs)


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call of the service's own methods (not health/reflection)."""

    def __init__(self, metrics: Metrics, prefix: str):
        self._metrics = metrics
        self._prefix = prefix

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        name = handler_call_details.method
        if handler is None or not name.startswith(self._prefix):
            return handler
        method = name.rsplit("/", 1)[-1]
        metrics = self._metrics

        def wrap(behaviour):
            async def timed(request_or_iterator, context):
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    return await behaviour(request_or_iterator, context)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    if not isinstance(code, grpc.StatusCode):
                        code = grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    metrics.observe(method, code, time.perf_counter() - start)

            return timed

        return rewrap(handler, wrap)


class _ConcurrencyLimit(grpc.aio.ServerInterceptor):
    """At most `limit` calls of the service's own methods in flight; one more is answered
    RESOURCE_EXHAUSTED at once (never queued), so a caller backs off instead of waiting on a server that
    is already full. Health checks and reflection are not counted: probes must still get through."""

    def __init__(self, limit: int, prefix: str, what: str):
        self._limit = limit
        self._prefix = prefix
        self._what = what
        self.in_flight = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler

        def wrap(behaviour):
            async def limited(request_or_iterator, context):
                if self.in_flight >= self._limit:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the {self._what} is at its limit of {self._limit} concurrent calls; "
                        "retry with backoff, or add replicas",
                    )
                self.in_flight += 1
                try:
                    return await behaviour(request_or_iterator, context)
                finally:
                    self.in_flight -= 1

            return limited

        return rewrap(handler, wrap)


def error_mapper(table: ErrorTable) -> Callable:
    """Decorator for servicer methods: a domain exception becomes `context.abort(status, message)`.

    `table` maps exception classes to status codes (first match in order wins). Anything else is a bug:
    logged with its traceback and answered INTERNAL, and the server keeps serving.
    """

    def decorate(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def mapped(self, request, context: grpc.aio.ServicerContext):
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                for kind, code in table.items():
                    if isinstance(exc, kind):
                        await context.abort(code, str(exc))
                log.exception("%s failed", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

        mapped.__name__ = method.__name__
        mapped.__doc__ = method.__doc__
        return mapped

    return decorate


@dataclass
class Server:
    """A built (not yet started) server: the grpc.aio server, its port, health and metrics."""

    grpc_server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: tuple[str, ...]
    metrics: Metrics
    # Health checks alone on a plaintext port, for a TLS server whose probes cannot speak TLS (Kubernetes'
    # gRPC probes, `ctl health` without --tls-ca); None when not asked for.
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    # said once the server listens (a server that cannot listen says only that): e.g. that it runs open
    notices: list[Callable[[], None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.grpc_server.start()
        log.info("%s listening on port %d", ", ".join(self.service_names), self.port)
        for notice in self.notices:
            notice()
        if self.health_server is not None:
            await self.health_server.start()
            log.info("plaintext health checks on port %d", self.health_port)

    async def stop(self, grace: float) -> None:
        if self.health_server is not None:
            await self.health_server.stop(grace)
        await self.grpc_server.stop(grace)

    async def begin(self) -> None:
        """Before start: the services NOT_SERVING until their dependencies answer, and `liveness` SERVING
        for as long as the process serves (a liveness probe must not restart a pod whose dependency is
        down: only readiness follows the dependencies)."""
        await self.set_serving(False)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (*self.service_names, ""):
            await self.health.set(name, status)


def build_server(
    *,
    service_names: tuple[str, ...],
    add_servicers: Callable[[grpc.aio.Server], None],
    address: str,
    metrics: Metrics,
    max_message_bytes: int,
    max_concurrent_calls: int = 0,
    auth: grpc.aio.ServerInterceptor | None = None,
    credentials: grpc.ServerCredentials | None = None,
    health_address: str | None = None,
) -> Server:
    """A grpc.aio server with the service(s), health (NOT_SERVING until told) and reflection, bound to
    `address` ("host:port"; port 0 picks a free one, read back from `Server.port`). `max_concurrent_calls`
    (0: no limit) bounds the service's calls in flight; `auth` checks tokens (ctl.security.TokenAuth);
    refused calls are counted in the metrics too; `credentials`: TLS; `health_address`: also answer health
    checks (only them) in plaintext there. Raises ListenError (setting `port` or `health_port`) when an
    address cannot be listened on."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    prefix = "/" + service_names[0].rsplit(".", 1)[0] + "."
    interceptors: list[grpc.aio.ServerInterceptor] = [_MetricsInterceptor(metrics, prefix)]
    if auth is not None:
        interceptors.append(auth)
    if max_concurrent_calls:
        interceptors.append(
            _ConcurrencyLimit(max_concurrent_calls, prefix, service_names[0].rsplit(".", 1)[-1])
        )
    server = grpc.aio.server(interceptors=interceptors, options=options)
    add_servicers(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = _bind(server, address, "port", credentials)
    health_server, health_port = None, None
    if health_address is not None:
        # not shared with another listener either (grpc's default is SO_REUSEPORT on: a second server on the
        # same health port would bind, and probes would reach either)
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        health_port = _bind(health_server, health_address, "health_port", None)
    return Server(server, port, health, service_names, metrics, health_server, health_port)
