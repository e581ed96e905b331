"""The encoder service's settings: one typed record, built from flags and CTL_ENCODER_* variables here only.

Every field has a flag (`--max-batch`) and an environment variable (`CTL_ENCODER_MAX_BATCH`), both derived
from the field name (ctl/settings.py); a flag given on the command line wins over the variable, which wins
over the default. The variables are read when `serve-encoder` runs, not while `ctl`'s parser is built,
and every value is checked: a bad one is a ConfigError naming the flag, the variable or the field.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ctl import defaults, settings
from ctl import server_settings as server
from ctl.serving import host_port
from ctl.settings import at_least, in_range, more_than, not_empty, setting
from encoder_service.errors import ConfigError

ENV_PREFIX = "CTL_ENCODER_"
BACKENDS = ("torchscript", "triton")
MiB = 1024 * 1024


# The longest a forward pass may wait for more images after the first: an hour. Any wait longer than a
# caller's deadline already means "until the batch is full" (what the batching tests ask for, with an hour,
# so that no machine is too slow for them), so nothing longer behaves differently; above it is a slip, or
# inf, which made every lone call wait out its deadline while health said SERVING. The default, 0, is the
# best measured (docs/BENCHMARKS.md).
MAX_WAIT_MS_LIMIT = 3_600_000.0


@dataclass(frozen=True)
class EncoderConfig:
    """How the encoder service runs; passed down to the server, the backends and the batchers. Every value
    is checked (here, and by `from_args` naming the flag or the variable): a bad one is a ConfigError."""

    model_repo: Path = field(
        default=Path("triton_repo"),
        metadata=setting(
            "exported model repository (`ctl export --out`): {scene,product}_encoder/1/model.pt"
        ),
    )
    backend: str = field(default="torchscript", metadata=setting("where the model runs", choices=BACKENDS))
    triton_url: str = field(
        default=defaults.TRITON_ADDRESS,
        metadata=setting("Triton gRPC address (backend triton)", check=not_empty),
    )
    triton_timeout_s: float = field(
        default=5.0, metadata=setting("timeout of every call to Triton, in seconds", check=more_than(0))
    )
    host: str = server.host("[::]")
    port: int = server.port(defaults.ENCODER_PORT)
    metrics_port: int = server.metrics_port(defaults.ENCODER_METRICS_PORT)
    max_message_bytes: int = server.max_message_bytes(64 * MiB)
    max_image_bytes: int = field(
        default=20 * MiB, metadata=setting("largest encoded image, in bytes", check=at_least(1))
    )
    max_image_pixels: int = field(
        default=40_000_000,
        metadata=setting("largest decoded image, in pixels (width × height)", check=at_least(1)),
    )
    max_batch: int = field(
        default=32,
        metadata=setting(
            "most images in one forward pass; EncodeProducts takes 4× this per call", check=at_least(1)
        ),
    )
    max_wait_ms: float = field(
        default=0.0,
        metadata=setting(
            "how long a forward pass waits for more images after the first, up to "
            f"{MAX_WAIT_MS_LIMIT:.0f}; 0 (best measured, docs/BENCHMARKS.md): a pass starts when the model "
            "is free, and what arrives meanwhile joins the next one",
            check=in_range(0, MAX_WAIT_MS_LIMIT),
        ),
    )
    max_concurrent_calls: int = server.max_concurrent_calls(256, "EncoderService")
    max_queue: int = field(
        default=256,
        metadata=setting(
            "most images waiting for a forward pass; more answer RESOURCE_EXHAUSTED", check=at_least(1)
        ),
    )
    inflight: int = field(
        default=0,
        metadata=setting(
            "forward passes in flight per encoder (0: 1 for torchscript, 4 for triton)", check=at_least(0)
        ),
    )
    grace_s: float = server.grace_s()
    decode_threads: int = field(default=2, metadata=setting("threads decoding images", check=at_least(1)))
    torch_threads: int = field(
        default=0,
        metadata=setting(
            "torch intra-op threads (0 keeps torch's default; backend torchscript)", check=at_least(0)
        ),
    )
    # Security (ctl/security.py)
    tls_cert: str = server.tls_cert()
    tls_key: str = server.tls_key()
    tls_client_ca: str = server.tls_client_ca()
    tokens: str = field(
        default="", metadata=setting("tokens that may call the encoder: 'a,b' or '@FILE' (one per line)")
    )
    health_port: int = server.health_port()
    protect_health: bool = server.protect_health()

    def __post_init__(self) -> None:
        settings.check_fields(self, ConfigError)

    @property
    def address(self) -> str:
        """host:port for grpc (an IPv6 host gets its brackets)."""
        return host_port(self.host, self.port)

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
