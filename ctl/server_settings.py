"""The settings every gRPC service has, written once: where it listens, its message and call limits, TLS,
the drain's grace. Each service's config (EncoderConfig, RankerConfig) declares these fields with the
functions here, so that their flags, checks and help agree; `ServerSettings` is what ctl.lifecycle reads.
Only the defaults differ between services (their ports, how many calls they take at once).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Protocol

from ctl.settings import at_least, message_size, not_empty, setting, tcp_port


class ServerSettings(Protocol):
    """The settings both services' configs have."""

    host: str
    port: int
    health_port: int  # -1: off
    metrics_port: int  # -1: off
    max_message_bytes: int
    max_concurrent_calls: int
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    protect_health: bool
    grace_s: float


def host(default: str) -> Any:
    return field(default=default, metadata=setting("address the gRPC server listens on", check=not_empty))


def port(default: int) -> Any:
    return field(default=default, metadata=setting("gRPC port (0: any free port)", check=tcp_port()))


def metrics_port(default: int) -> Any:
    return field(
        default=default,
        metadata=setting("Prometheus /metrics port (0: any free port, -1: off)", check=tcp_port(off=True)),
    )


def health_port() -> Any:
    return field(
        default=-1,
        metadata=setting(
            "also answer health checks (only them) in plaintext on this port, for probes of a TLS server "
            "(-1: off, 0: any free port)",
            check=tcp_port(off=True),
        ),
    )


def max_message_bytes(default: int) -> Any:
    return field(
        default=default,
        metadata=setting("largest gRPC message received or sent, in bytes", check=message_size),
    )


def max_concurrent_calls(default: int, service: str) -> Any:
    return field(
        default=default,
        metadata=setting(
            f"{service} calls in flight; one more gets RESOURCE_EXHAUSTED at once (0: no limit)",
            check=at_least(0),
        ),
    )


def grace_s(default: float = 10.0) -> Any:
    return field(
        default=default,
        metadata=setting("on SIGTERM, seconds in-flight calls get to finish", check=at_least(0)),
    )


def tls_cert() -> Any:
    return field(default="", metadata=setting("PEM certificate of this server (with --tls-key: TLS)"))


def tls_key() -> Any:
    return field(default="", metadata=setting("PEM private key of this server"))


def tls_client_ca() -> Any:
    return field(
        default="", metadata=setting("PEM CA that client certificates must be signed by (mutual TLS)")
    )


def protect_health() -> Any:
    return field(
        default=False, metadata=setting("require a token for health checks and reflection too (true/false)")
    )
