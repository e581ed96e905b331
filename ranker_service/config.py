"""The ranker's settings: one typed record, built from flags and CTL_RANKER_* variables here only.

Every field has a flag (`--upsert-batch`) and an environment variable (`CTL_RANKER_UPSERT_BATCH`), both
derived from the field name (ctl/settings.py); a flag given on the command line wins over the variable,
which wins over the default. The variables are read when `serve-ranker` runs, not while `ctl`'s parser is
built, and every value is checked: a bad one is a ConfigError naming the flag, the variable or the field.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

from ctl import defaults, settings
from ctl import server_settings as server
from ctl.settings import at_least, more_than, not_empty, setting
from ranker_service.errors import ConfigError

ENV_PREFIX = "CTL_RANKER_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class RankerConfig:
    """How the ranker service runs; passed down to the server, the servicer and the store."""

    host: str = server.host("0.0.0.0")
    port: int = server.port(defaults.RANKER_PORT)
    metrics_port: int = server.metrics_port(defaults.RANKER_METRICS_PORT)
    encoder: str = field(
        default=defaults.ENCODER_ADDRESS,
        metadata=setting("the encoder service, host:port", check=not_empty),
    )
    encoder_timeout_s: float = field(
        default=10.0,
        metadata=setting(
            "deadline of every encoder call (a caller's shorter deadline wins)", check=more_than(0)
        ),
    )
    encoder_products_timeout_s: float = field(
        default=300.0,
        metadata=setting(
            "deadline of the encoder calls of UpsertProducts, which may queue behind a slow model (a "
            "caller's shorter deadline wins)",
            check=more_than(0),
        ),
    )
    # Embedded store (qdrant-edge): a directory, one per model.
    store_path: str = field(
        default=defaults.STORE_PATH,
        metadata=setting("embedded store directory; {model_version} is replaced", check=not_empty),
    )
    # A Qdrant server/cluster instead (qdrant-client).
    qdrant_url: str = field(
        default="", metadata=setting("use a Qdrant server/cluster at this URL instead of the embedded store")
    )
    collection: str = field(
        default="ctl_products_{model_version}",
        metadata=setting(
            "Qdrant collection (with --qdrant-url); {model_version} is replaced", check=not_empty
        ),
    )
    qdrant_api_key: str = field(
        default="",
        metadata=setting("Qdrant API key, or @FILE holding it (prefer the environment variable or a file)"),
    )
    qdrant_tls_ca: str = field(
        default="",
        metadata=setting(
            "PEM CA that the Qdrant server's certificate must be signed by (https:// URL; default: the "
            "system's CAs)"
        ),
    )
    qdrant_timeout_s: float = field(
        default=10.0, metadata=setting("Qdrant request timeout", check=more_than(0))
    )
    qdrant_shards: int = field(
        default=0,
        metadata=setting(
            "shards of a new collection (a cluster; 0: the server's default)", check=at_least(0)
        ),
    )
    qdrant_replication_factor: int = field(
        default=0,
        metadata=setting(
            "copies of each shard of a new collection (0: the server's default)", check=at_least(0)
        ),
    )
    max_message_bytes: int = server.max_message_bytes(64 * MiB)
    max_limit: int = field(default=1000, metadata=setting("largest Recommend limit", check=at_least(1)))
    max_categories: int = field(
        default=32, metadata=setting("most categories in one Recommend", check=at_least(1))
    )
    max_pool: int = field(
        default=10_000,
        metadata=setting("most candidates scored per category in pooled mode", check=at_least(1)),
    )
    max_filters: int = field(
        default=16,
        metadata=setting(
            "most metadata filters in one Recommend (each costs a pass over the category's products on "
            "unindexed metadata, per engine call: docs/BENCHMARKS.md)",
            check=at_least(0),
        ),
    )
    max_filter_values: int = field(
        default=1000,
        metadata=setting("most any_of + none_of values of one Recommend filter", check=at_least(1)),
    )
    max_filter_bytes: int = field(
        default=64 * 1024,
        metadata=setting(
            "most bytes of filter values (any_of and none_of, all filters) in one Recommend",
            check=at_least(1),
        ),
    )
    max_exclude: int = field(
        default=10_000,
        metadata=setting("most exclude_product_ids in one Recommend", check=at_least(0)),
    )
    max_catalog_categories: int = field(
        default=10_000,
        metadata=setting(
            "most categories in the catalog: a product of a new category beyond this fails "
            "(RESOURCE_EXHAUSTED); GetCatalogStats lists every category in one reply",
            check=at_least(1),
        ),
    )
    max_metadata_keys: int = field(
        default=64, metadata=setting("most metadata keys of one product", check=at_least(0))
    )
    max_metadata_value_bytes: int = field(
        default=4096, metadata=setting("largest metadata value of a product, in bytes", check=at_least(1))
    )
    max_metadata_bytes: int = field(
        default=16_384,
        metadata=setting(
            "largest metadata of a product, keys and values together, in bytes (every Recommend reply "
            "carries it)",
            check=at_least(1),
        ),
    )
    max_certify_width: int = field(
        default=4096,
        metadata=setting(
            "certify's bound queries stop widening at this many products each (at most --max-pool); a "
            "category not certified by then is answered with certified=false",
            check=at_least(1),
        ),
    )
    max_stream_records: int = field(
        default=100_000,
        metadata=setting(
            "most products in one UpsertProducts stream (more: RESOURCE_EXHAUSTED, after the first ones are "
            "stored)",
            check=at_least(1),
        ),
    )
    max_concurrent_calls: int = server.max_concurrent_calls(64, "RankerService")
    exact_below: int = field(
        default=200_000,
        metadata=setting(
            "pooled mode queries categories of at most this many products exactly (a scan in the store; "
            "its cost: docs/BENCHMARKS.md); larger ones through the store's HNSW index",
            check=at_least(0),
        ),
    )
    upsert_batch: int = field(
        default=32,
        metadata=setting(
            "images per encoder call and points per store write during UpsertProducts", check=at_least(1)
        ),
    )
    upsert_batch_bytes: int = field(
        default=16 * MiB,
        metadata=setting(
            "image bytes per batch of UpsertProducts: a batch is sent once it holds this many (or "
            "--upsert-batch images); a stream holds at most (upsert concurrency + 1) batches",
            check=at_least(1),
        ),
    )
    upsert_bytes_in_flight: int = field(
        default=32 * MiB,
        metadata=setting(
            "bytes of UpsertProducts records held at once, from read until encoded, over all streams (a "
            "stream waits, reading nothing; a larger record waits until nothing is held, then goes)",
            check=at_least(1),
        ),
    )
    max_upsert_streams: int = field(
        default=8,
        metadata=setting(
            "UpsertProducts streams open at once; one more is refused (RESOURCE_EXHAUSTED, retried by ctl "
            "ingest): each holds records and gRPC's buffers, several times its largest image",
            check=at_least(1),
        ),
    )
    upsert_concurrency: int = field(
        default=2,
        metadata=setting("encoder calls in flight per UpsertProducts stream", check=at_least(1)),
    )
    probe_interval_s: float = field(
        default=5.0,
        metadata=setting(
            "seconds between health probes of the encoder and the store (at least 0.1: a probe's "
            "health check may take up to this long)",
            check=at_least(0.1),
        ),
    )
    startup_timeout_s: float = field(
        default=120.0,
        metadata=setting(
            "seconds to wait at start-up for the encoder, and for a store that cannot be opened yet (held "
            "by another process, server unreachable); then exit 1 (0: forever)",
            check=at_least(0),
        ),
    )
    grace_s: float = server.grace_s()
    # Security (ctl/security.py): TLS for this server, tokens per scope, and how to reach the encoder.
    tls_cert: str = server.tls_cert()
    tls_key: str = server.tls_key()
    tls_client_ca: str = server.tls_client_ca()
    read_tokens: str = field(
        default="",
        metadata=setting(
            "tokens that may call Recommend and GetCatalogStats: 'a,b' or '@FILE' (one per line)"
        ),
    )
    write_tokens: str = field(
        default="",
        metadata=setting("tokens that may call UpsertProducts and DeleteProducts: 'a,b' or '@FILE'"),
    )
    protect_health: bool = server.protect_health()
    health_port: int = server.health_port()
    encoder_token: str = field(
        default="", metadata=setting("token sent to the encoder service, or @FILE holding it")
    )
    encoder_tls_ca: str = field(
        default="", metadata=setting("PEM CA of the encoder's certificate (TLS to the encoder)")
    )
    encoder_tls_cert: str = field(
        default="", metadata=setting("PEM client certificate for the encoder (mutual TLS)")
    )
    encoder_tls_key: str = field(default="", metadata=setting("PEM private key of --encoder-tls-cert"))

    def __post_init__(self) -> None:
        settings.check_fields(self, ConfigError)

    def store_location(self, model_version: str) -> str:
        if self.qdrant_url:
            return self.collection.replace("{model_version}", model_version)
        return self.store_path.replace("{model_version}", model_version)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per RankerConfig field, default None (the environment is read by `from_args`); the help
    names each variable and default, never the value of a key or a token."""
    settings.add_arguments(parser, RankerConfig, ENV_PREFIX, secrets=("key", "token"))


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> RankerConfig:
    """The config from parsed flags, then CTL_RANKER_* variables (`environ`, default os.environ), then the
    defaults. Raises ConfigError naming the flag or variable that is malformed or out of range."""
    return settings.from_args(RankerConfig, args, environ, ENV_PREFIX, ConfigError)
