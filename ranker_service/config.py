"""The ranker's settings: one dataclass, built from flags and CTL_RANKER_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from ctl.serving import parse_bool

MiB = 1024 * 1024


@dataclass(frozen=True)
class RankerConfig:
    host: str = "0.0.0.0"
    port: int = 50052
    metrics_port: int = 9465  # 0: any free port, -1: off
    encoder: str = "localhost:50051"
    encoder_timeout_s: float = 10.0
    encoder_products_timeout_s: float = 300.0  # EncodeProducts during UpsertProducts (batch work)
    # Embedded store (qdrant-edge): a directory; {model_version} is replaced (one store per model).
    store_path: str = "ctl-store/{model_version}"
    # A Qdrant server/cluster instead (qdrant-client): URL, collection ({model_version} replaced), API key.
    qdrant_url: str = ""
    collection: str = "ctl_products_{model_version}"
    qdrant_api_key: str = ""
    qdrant_tls_ca: str = ""  # PEM CA of the Qdrant server's certificate (an https:// URL)
    qdrant_timeout_s: float = 10.0
    qdrant_shards: int = 0  # when the collection is created; 0: the server's default
    qdrant_replication_factor: int = 0  # copies of each shard; 0: the server's default
    max_message_bytes: int = 64 * MiB
    max_limit: int = 1000
    max_categories: int = 32
    max_pool: int = 10_000
    max_stream_records: int = 100_000  # products in one UpsertProducts stream
    max_concurrent_calls: int = 64  # more in flight: RESOURCE_EXHAUSTED at once (0: no limit)
    exact_below: int = 200_000  # categories up to this size: exact candidate queries (a scan), not HNSW
    upsert_batch: int = 32  # images per EncodeProducts call, points per store upsert
    upsert_concurrency: int = 2  # encoder calls in flight per stream
    probe_interval_s: float = 5.0  # how often health re-checks the encoder and the store
    startup_timeout_s: float = 120.0  # wait for the encoder and the store at start-up (0: forever)
    grace_s: float = 10.0
    # Security (ctl/security.py): TLS for this server, tokens per scope, and how to reach the encoder.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    read_tokens: str = ""
    write_tokens: str = ""
    protect_health: bool = False
    health_port: int = -1  # plaintext health checks only (for probes of a TLS server); -1: off, 0: any
    encoder_token: str = ""
    encoder_tls_ca: str = ""
    encoder_tls_cert: str = ""
    encoder_tls_key: str = ""

    def store_location(self, model_version: str) -> str:
        if self.qdrant_url:
            return self.collection.replace("{model_version}", model_version)
        return self.store_path.replace("{model_version}", model_version)


_HELP = {
    "host": "address to listen on",
    "port": "gRPC port (0: any free port)",
    "metrics_port": "Prometheus /metrics port (0: any free port, -1: off)",
    "encoder": "the encoder service, host:port",
    "encoder_timeout_s": "deadline of every encoder call (a caller's shorter deadline wins)",
    "encoder_products_timeout_s": "deadline of the encoder calls of UpsertProducts, which may queue behind a "
    "slow model (a caller's shorter deadline wins)",
    "store_path": "embedded store directory; {model_version} is replaced",
    "qdrant_url": "use a Qdrant server/cluster at this URL instead of the embedded store",
    "collection": "Qdrant collection (with --qdrant-url); {model_version} is replaced",
    "qdrant_api_key": "Qdrant API key, or @FILE holding it (prefer the environment variable or a file)",
    "qdrant_tls_ca": "PEM CA that the Qdrant server's certificate must be signed by (https:// URL; default: "
    "the system's CAs)",
    "qdrant_timeout_s": "Qdrant request timeout",
    "qdrant_shards": "shards of a new collection (a cluster; 0: the server's default)",
    "qdrant_replication_factor": "copies of each shard of a new collection (0: the server's default)",
    "max_message_bytes": "largest gRPC message received or sent",
    "max_limit": "largest Recommend limit",
    "max_categories": "most categories in one Recommend",
    "max_pool": "most candidates scored per category in pooled mode",
    "max_stream_records": "most products in one UpsertProducts stream (more: RESOURCE_EXHAUSTED, after the "
    "first ones are stored)",
    "max_concurrent_calls": "RankerService calls in flight; one more gets RESOURCE_EXHAUSTED at once "
    "(0: no limit)",
    "exact_below": "pooled mode queries categories of at most this many products exactly (a scan "
    "in the store, ~20 ms per 100k); larger ones through the store's HNSW index",
    "upsert_batch": "images per encoder call and points per store write during UpsertProducts",
    "upsert_concurrency": "encoder calls in flight per UpsertProducts stream",
    "probe_interval_s": "seconds between health probes of the encoder and the store",
    "startup_timeout_s": "seconds to wait at start-up for the encoder, and for a store that cannot be opened "
    "yet (held by another process, server unreachable); then exit 1 (0: forever)",
    "grace_s": "seconds in-flight calls get at shutdown",
    "tls_cert": "PEM certificate of this server (with --tls-key: TLS)",
    "tls_key": "PEM private key of this server",
    "tls_client_ca": "PEM CA that client certificates must be signed by (mutual TLS)",
    "read_tokens": "tokens that may call Recommend and GetCatalogStats: 'a,b' or '@FILE' (one per line)",
    "write_tokens": "tokens that may call UpsertProducts and DeleteProducts: 'a,b' or '@FILE'",
    "protect_health": "require a token for health checks and reflection too (true/false)",
    "health_port": "also answer health checks (only them) in plaintext on this port, for probes of a TLS "
    "server (-1: off, 0: any free port)",
    "encoder_token": "token sent to the encoder service, or @FILE holding it",
    "encoder_tls_ca": "PEM CA of the encoder's certificate (TLS to the encoder)",
    "encoder_tls_cert": "PEM client certificate for the encoder (mutual TLS)",
    "encoder_tls_key": "PEM private key of --encoder-tls-cert",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; its default comes from CTL_RANKER_<NAME>, else the dataclass default."""
    for f in fields(RankerConfig):
        env = "CTL_RANKER_" + f.name.upper()
        default = os.environ.get(env, f.default)
        shown = "" if "key" in f.name or "token" in f.name else "; default %(default)s"  # no secrets
        kind = parse_bool if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=kind(default),
            help=f"{_HELP[f.name]} (env {env}{shown})",
        )


def from_args(args: argparse.Namespace) -> RankerConfig:
    return RankerConfig(**{f.name: getattr(args, f.name) for f in fields(RankerConfig)})
