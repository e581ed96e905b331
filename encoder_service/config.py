"""The encoder service's settings: one typed record, built from flags and CTL_ENCODER_* variables here only.

Every field has a flag (`--max-batch`) and an environment variable (`CTL_ENCODER_MAX_BATCH`), both derived
from the field name (ctl/settings.py); a flag given on the command line wins over the variable, which wins
over the default. The variables are read when `serve-encoder` runs, not while `ctl`'s parser is built.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctl import settings
from encoder_service.errors import ConfigError

ENV_PREFIX = "CTL_ENCODER_"
BACKENDS = ("torchscript", "triton")
MiB = 1024 * 1024


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class EncoderConfig:
    """How the encoder service runs; passed down to the server, the backends and the batchers."""

    model_repo: Path = field(
        default=Path("triton_repo"),
        metadata=_help("exported model repository (`ctl export --out`): {scene,product}_encoder/1/model.pt"),
    )
    backend: str = field(default="torchscript", metadata=_help("where the model runs", choices=BACKENDS))
    triton_url: str = field(default="localhost:8001", metadata=_help("Triton gRPC address (backend triton)"))
    triton_timeout_s: float = field(
        default=5.0, metadata=_help("timeout of every call to Triton, in seconds")
    )
    host: str = field(default="[::]", metadata=_help("address the gRPC server listens on"))
    port: int = field(default=50051, metadata=_help("gRPC port (0 picks a free one)"))
    metrics_port: int = field(
        default=9464, metadata=_help("Prometheus /metrics port (0 picks a free one, -1 turns it off)")
    )
    max_message_bytes: int = field(default=64 * MiB, metadata=_help("largest gRPC message, in bytes"))
    max_image_bytes: int = field(default=20 * MiB, metadata=_help("largest encoded image, in bytes"))
    max_image_pixels: int = field(
        default=40_000_000, metadata=_help("largest decoded image, in pixels (width × height)")
    )
    max_batch: int = field(
        default=32, metadata=_help("most images in one forward pass; EncodeProducts takes 4× this per call")
    )
    max_wait_ms: float = field(
        default=0.0,
        metadata=_help(
            "how long a forward pass waits for more images after the first; 0 (best measured, "
            "docs/BENCHMARKS.md): a pass starts when the model is free, and what arrives meanwhile "
            "joins the next one"
        ),
    )
    max_concurrent_calls: int = field(
        default=256,
        metadata=_help(
            "EncoderService calls in flight; one more gets RESOURCE_EXHAUSTED at once (0: no limit)"
        ),
    )
    max_queue: int = field(
        default=256, metadata=_help("most images waiting for a forward pass; more answer RESOURCE_EXHAUSTED")
    )
    inflight: int = field(
        default=0,
        metadata=_help("forward passes in flight per encoder (0: 1 for torchscript, 4 for triton)"),
    )
    grace_s: float = field(
        default=10.0, metadata=_help("on SIGTERM, how long in-flight calls may take to finish")
    )
    decode_threads: int = field(default=2, metadata=_help("threads decoding images"))
    torch_threads: int = field(
        default=0, metadata=_help("torch intra-op threads (0 keeps torch's default; backend torchscript)")
    )
    # Security (ctl/security.py)
    tls_cert: str = field(default="", metadata=_help("PEM certificate of this server (with --tls-key: TLS)"))
    tls_key: str = field(default="", metadata=_help("PEM private key of this server"))
    tls_client_ca: str = field(
        default="", metadata=_help("PEM CA that client certificates must be signed by (mutual TLS)")
    )
    tokens: str = field(
        default="", metadata=_help("tokens that may call the encoder: 'a,b' or '@FILE' (one per line)")
    )
    health_port: int = field(
        default=-1,
        metadata=_help(
            "also answer health checks (only them) in plaintext on this port, for probes of a TLS server "
            "(-1: off, 0: any free port)"
        ),
    )
    protect_health: bool = field(
        default=False, metadata=_help("require a token for health checks and reflection too (true/false)")
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port}: expected 0..65535")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port={self.metrics_port}: expected -1 (off), 0 or a port")
        for name in ("max_message_bytes", "max_image_bytes", "max_image_pixels", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive number")
        if self.inflight < 0:
            raise ConfigError(f"inflight={self.inflight}: expected 0 (automatic) or more")
        if self.decode_threads < 1:
            raise ConfigError(f"decode_threads={self.decode_threads}: expected at least 1")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads={self.torch_threads}: expected 0 (torch's default) or more")
        for name in ("max_wait_ms", "grace_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: expected 0 or more")
        if self.triton_timeout_s <= 0:
            raise ConfigError(f"triton_timeout_s={self.triton_timeout_s}: expected more than 0")

    @property
    def address(self) -> str:
        """host:port for grpc (an IPv6 host gets its brackets)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    @property
    def forward_workers(self) -> int:
        """Forward passes in flight per encoder: the in-process model already uses every core; Triton
        overlaps transfers and merges concurrent requests in its own dynamic batcher."""
        if self.inflight:
            return self.inflight
        return 4 if self.backend == "triton" else 1

    @property
    def max_images_per_call(self) -> int:
        """The EncodeProducts limit (ModelInfo.max_batch_images)."""
        return self.max_batch * 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EncoderConfig field. Defaults stay None so that `from_args` can tell a given flag
    from an absent one (and fall back to the environment)."""
    settings.add_arguments(parser, EncoderConfig, ENV_PREFIX, secrets=("token",))


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> EncoderConfig:
    """The config from parsed flags, then CTL_ENCODER_* variables (`environ`, default os.environ),
    then the defaults. Raises ConfigError naming the flag or variable that is wrong."""
    return settings.from_args(EncoderConfig, args, environ, ENV_PREFIX, ConfigError)
