"""`ctl ingest`: flags (each with a CTL_INGEST_* environment variable) and the command's lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import grpc

from ctl import defaults
from ctl.security import add_client_arguments, aio_channel, client_security
from ctl.serving import parse_bool
from ctl.settings import GRPC_MAX_MESSAGE_BYTES, parse_int
from ctl.terminal import printable
from ctl_app.ingest.catalog import FORMATS, MAX_IMAGE_BYTES, CatalogError
from ctl_app.ingest.job import BATCH_BYTES, MAX_BYTES_IN_FLIGHT, IngestConfig, Summary, format_summary, ingest

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
OLD_STORE_PATH_ENV = "CTL_INGEST_STORE_PATH"  # deprecated: CTL_RANKER_STORE_PATH


class _FromEnvironment(str):
    """The text of a CTL_INGEST_* variable used as a flag's default, marked so that a count's type can tell
    it from the flag's own text and name the one that is wrong."""


def _env(name: str, default: str | None = None) -> str | None:
    """The text of CTL_INGEST_<name>, as a flag's default: argparse converts a text default with the flag's
    type only when `ctl ingest` itself is parsed, so a malformed variable never breaks another command."""
    text = os.environ.get(f"CTL_INGEST_{name}")
    return default if text is None else _FromEnvironment(text)


def _count(name: str, low: int, high: int):
    """The type of the count flag `--name` (default: CTL_INGEST_<NAME>'s text): an int of at least `low`
    (digits only, ctl/settings.py), or an error naming the variable when the text came from it, as the
    services' settings do (`CTL_INGEST_BATCH='0': expected 1 or more`); argparse names the flag."""
    variable = f"CTL_INGEST_{name.upper()}"

    def parse(text: str) -> int:
        try:
            value = parse_int(text[:20]) if len(text) <= 20 else high + 1
            problem = None if low <= value <= high else f"expected {low}..{high}"
        except argparse.ArgumentTypeError:
            problem = "expected a whole number"
        if problem is None:
            return value
        shown = repr(str(text)) if len(text) <= 40 else repr(str(text)[:40]) + "…"
        if isinstance(text, _FromEnvironment):  # argparse's message names the flag, not the variable
            raise argparse.ArgumentTypeError(f"{variable}={shown}: {problem}")
        raise argparse.ArgumentTypeError(f"{problem}, got {shown}")

    return parse


def _switch(name: str) -> bool:
    """CTL_INGEST_<name> as a switch: true/false, yes/no, on/off, 1/0 (unset: false). Read when the job
    runs; a ValueError naming the variable otherwise (exit 2)."""
    variable = f"CTL_INGEST_{name}"
    text = os.environ.get(variable, "")
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"{variable}={text[:40]!r}: expected true or false") from None


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
    p.add_argument(
        "--images",
        type=Path,
        help="folder the image paths are relative to, and that they must lie in once links are followed "
        "(default: the catalog's)",
    )
    p.add_argument(
        "--allow-images-outside",
        action="store_true",
        help="read image files outside --images too (absolute paths, ../, links): only for a catalog you "
        "trust as much as this job's file access (env CTL_INGEST_ALLOW_IMAGES_OUTSIDE; default false)",
    )
    p.add_argument("--format", choices=FORMATS, help="catalog format (default: from the suffix)")
    p.add_argument("--metadata-columns", default="", help="comma-separated extra columns kept as metadata")
    p.add_argument(
        "--ranker",
        default=_env("RANKER", defaults.RANKER_ADDRESS),
        help="the ranker, host:port (env CTL_INGEST_RANKER; default %(default)s)",
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="no ranker to reach: run the encoder and the ranker in this process (needs --model-repo)",
    )
    p.add_argument(
        "--model-repo", type=Path, default=_env("MODEL_REPO"), help="with --embedded: exported encoders"
    )
    p.add_argument(
        "--store-path",
        help="with --embedded: the store directory ({model_version} is replaced; env "
        f"{defaults.STORE_PATH_ENV}, the ranker's; default {defaults.STORE_PATH})",
    )
    for name, default, low, high, text in (
        ("batch", "64", 1, 100_000, "records per stream"),
        ("batch_bytes", str(BATCH_BYTES), 1, 1 << 40, "image bytes per stream (a larger image goes alone)"),
        ("streams", "4", 1, 256, "streams in flight"),
        (
            "max_bytes_in_flight",
            str(MAX_BYTES_IN_FLIGHT),
            1,
            1 << 40,
            "image bytes the job holds at once, read ahead, queued and in flight, besides the one image "
            "being read: the reader waits for streams to end (a larger image goes alone)",
        ),
        ("retries", "5", 0, 100, "retries of a failed stream"),
        (
            "max_image_bytes",
            str(MAX_IMAGE_BYTES),
            1,
            GRPC_MAX_MESSAGE_BYTES,
            "largest image file sent, in bytes; larger ones fail unread (the encoder's --max-image-bytes)",
        ),
    ):
        variable = f"CTL_INGEST_{name.upper()}"
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=_count(name, low, high),
            default=_env(name.upper(), default),
            help=f"{text} (env {variable}; default {default})",
        )
    p.add_argument("--journal", type=Path, help="journal file (default: CATALOG.journal)")
    p.add_argument("--errors", type=Path, help="error report (default: CATALOG.errors.jsonl)")
    p.add_argument("--fresh", action="store_true", help="ignore the journal: send every record again")
    add_client_arguments(p)
    p.set_defaults(func=main)
    return p


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    return IngestConfig(
        catalog=args.catalog,
        images=args.images,
        format=args.format,
        metadata_columns=tuple(c.strip() for c in args.metadata_columns.split(",") if c.strip()),
        batch=args.batch,
        batch_bytes=args.batch_bytes,
        streams=args.streams,
        max_bytes_in_flight=args.max_bytes_in_flight,
        retries=args.retries,
        journal=args.journal,
        errors=args.errors,
        fresh=args.fresh,
        allow_images_outside=args.allow_images_outside or _switch("ALLOW_IMAGES_OUTSIDE"),
        max_image_bytes=args.max_image_bytes,
    )


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
        if args.embedded and not args.model_repo:
            raise ValueError("--embedded needs --model-repo (the folder `ctl export` wrote)")
        if args.embedded:
            summary = asyncio.run(run_embedded(config, args.model_repo, embedded_store_path(args.store_path)))
        else:
            credentials, token = client_security(args)
            summary = asyncio.run(run_against(config, args.ranker, credentials, token))
    except (CatalogError, ValueError) as exc:  # SecurityConfigError is a ValueError
        log.error("%s", exc)
        return 2
    except grpc.aio.AioRpcError as exc:
        log.error("the ranker at %s: %s: %s", args.ranker, exc.code().name, printable(exc.details()))
        return 1
    print(format_summary(config, summary))
    return 0 if summary.ok else 1
