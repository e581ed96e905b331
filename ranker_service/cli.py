"""`ctl serve-ranker`: the ranker service's command."""

from __future__ import annotations

import argparse
import asyncio
import logging

from ranker_service.config import add_arguments, from_args

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve-ranker",
        help="serve Recommend and catalog ingestion (gRPC ctl.v1.RankerService)",
        description="Serves ctl.v1.RankerService with health checking, reflection and Prometheus metrics. "
        "Product vectors live in the embedded Qdrant engine (a directory) or a Qdrant server (--qdrant-url).",
    )
    add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Runs until SIGTERM/SIGINT: 0 after a clean stop, 2 for an unusable TLS file or token setting, 1 when
    it cannot start (encoder never answered, store locked or made by another model, port taken). Logging
    is set up by the caller (`ctl`)."""
    from ctl.security import SecurityConfigError
    from ranker_service.errors import RankerError
    from ranker_service.server import run

    try:
        asyncio.run(run(from_args(args)))
    except SecurityConfigError as exc:
        log.error("ranker service cannot start: %s", exc)
        return 2
    except (RankerError, OSError) as exc:
        log.error("ranker service stopped: %s", exc)
        return 1
    return 0
