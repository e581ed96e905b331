"""`ctl ingest`: its settings (flags and CTL_INGEST_* variables, ctl.settings) and the command's lifecycle.

The job's settings are IngestConfig's fields (ctl_app/ingest/job.py); IngestCommand adds where the job
sends (`--ranker`, or `--embedded` with `--model-repo`). Every field has a flag (`--max-bytes-in-flight`)
and a variable (`CTL_INGEST_MAX_BYTES_IN_FLIGHT`); a flag wins over the variable, which wins over the
default. The variables are read when `ctl ingest` runs, not while `ctl`'s parser is built, so a malformed
one never breaks another command; a bad value stops the job with exit status 2 and one line naming the
flag or the variable. `--store-path` is the exception: its variable is the ranker's (CTL_RANKER_STORE_PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ctl import defaults, settings
from ctl.security import add_client_arguments, aio_channel, client_security
from ctl.settings import not_empty, setting
from ctl.terminal import printable
from ctl_app.ingest.catalog import CatalogError
from ctl_app.ingest.job import ConfigError, IngestConfig, Summary, format_summary, ingest

log = logging.getLogger(__name__)
ENV_PREFIX = "CTL_INGEST_"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
OLD_STORE_PATH_ENV = "CTL_INGEST_STORE_PATH"  # deprecated: CTL_RANKER_STORE_PATH


@dataclass(frozen=True)
class IngestCommand(IngestConfig):
    """`ctl ingest`'s settings: the job's, and where it sends."""

    ranker: str = field(
        default=defaults.RANKER_ADDRESS, metadata=setting("the ranker, host:port", check=not_empty)
    )
    embedded: bool = field(
        default=False,
        metadata=setting(
            "no ranker to reach: run the encoder and the ranker in this process (needs --model-repo)",
            switch=True,
        ),
    )
    model_repo: Path | None = field(
        default=None, metadata=setting("with --embedded: exported encoders (`ctl export --out`)")
    )


def embedded_store_path(given: str | None) -> str:
    """The store `--embedded` opens: the flag, else CTL_RANKER_STORE_PATH (the same store `ctl serve-ranker`
    and `ctl restore` open), else the default. CTL_INGEST_STORE_PATH, its old name here, still works
    (with a warning) when the new one is not set."""
    if given is not None:
        return given
    old = os.environ.get(OLD_STORE_PATH_ENV)
    if old is not None:
        if defaults.STORE_PATH_ENV in os.environ:
            log.warning("%s is ignored: %s is set", OLD_STORE_PATH_ENV, defaults.STORE_PATH_ENV)
        else:
            log.warning("%s is deprecated: set %s instead", OLD_STORE_PATH_ENV, defaults.STORE_PATH_ENV)
            return old
    return os.environ.get(defaults.STORE_PATH_ENV, defaults.STORE_PATH)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ingest",
        help="stream a product catalog (JSON lines or CSV + image files) into the ranker; resumable",
        description="Reads CATALOG (columns product_id, category, image, metadata) and sends it to the "
        "ranker's UpsertProducts, several streams at once. A journal next to the catalog makes a killed job "
        "continue where it stopped; every record that is not ingested is listed with its reason in the "
        "error report. Exit status 0: all ingested; 1: some failed or the job stopped; 2: bad arguments.",
    )
    p.add_argument("catalog", type=Path, help="catalog file: .jsonl or .csv")
    settings.add_arguments(p, IngestCommand, ENV_PREFIX)
    p.add_argument(
        "--store-path",
        help="with --embedded: the store directory ({model_version} is replaced; env "
        f"{defaults.STORE_PATH_ENV}, the ranker's; default {defaults.STORE_PATH})",
    )
    add_client_arguments(p)
    p.set_defaults(func=main)
    return p


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> IngestCommand:
    """The settings from parsed flags, then CTL_INGEST_* variables (`environ`, default os.environ), then
    the defaults. Raises ConfigError naming the flag or the variable that is wrong."""
    return settings.from_args(IngestCommand, args, environ, ENV_PREFIX, ConfigError, catalog=args.catalog)


async def run_against(
    config: IngestConfig, address: str, credentials: grpc.ChannelCredentials | None = None, token: str = ""
) -> Summary:
    # GetProducts' replies carry the store's metadata, which may be larger than the catalog's
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    async with aio_channel(address, credentials, token, options=options) as channel:
        return await ingest(config, channel)


async def run_embedded(config: IngestConfig, model_repo: Path, store_path: str) -> Summary:
    from ctl_app.local import local_services

    async with local_services(model_repo, store_path) as services:
        return await run_against(config, services.ranker_address)


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        if config.embedded and not config.model_repo:
            raise ConfigError("--embedded needs --model-repo (the folder `ctl export` wrote)")
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        if config.embedded:
            store_path = embedded_store_path(args.store_path)
            summary = asyncio.run(run_embedded(config, config.model_repo, store_path))
        else:
            credentials, token = client_security(args, config.ranker)
            summary = asyncio.run(run_against(config, config.ranker, credentials, token))
    except (CatalogError, ValueError) as exc:  # SecurityConfigError is a ValueError
        log.error("%s", exc)
        return 2
    except grpc.aio.AioRpcError as exc:
        log.error("the ranker at %s: %s: %s", config.ranker, exc.code().name, printable(exc.details()))
        return 1
    print(format_summary(config, summary))
    return 0 if summary.ok else 1
