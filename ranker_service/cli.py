"""`ctl serve-ranker`: the ranker service's command, configured by flags or CTL_RANKER_* variables."""

from __future__ import annotations

import argparse
import asyncio
import logging

from ctl.serving import ListenError
from ctl.settings import named
from ranker_service.config import ENV_PREFIX, add_arguments, from_args
from ranker_service.errors import ConfigError, RankerError

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `serve-ranker` (its flags from RankerConfig) to the `ctl` subcommands; sets func=main."""
    parser = subparsers.add_parser(
        "serve-ranker",
        help="serve Recommend and catalog ingestion (gRPC ctl.v1.RankerService)",
        description="Serves ctl.v1.RankerService with health checking, reflection and Prometheus metrics. "
        "Product vectors live in the embedded Qdrant engine (a directory) or a Qdrant server (--qdrant-url). "
        "Every flag also reads a CTL_RANKER_* environment variable; a flag given wins.",
    )
    add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Runs until SIGTERM/SIGINT: 0 after a clean stop, 2 for a bad setting (one line naming it) or an
    unusable TLS file or token setting, 1 when it cannot start (encoder never answered, store locked or made
    by another model, port taken). Logging is set up by the caller (`ctl`)."""
    from ctl.security import SecurityConfigError
    from ranker_service.server import run

    try:
        config = from_args(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        asyncio.run(run(config))
    except SecurityConfigError as exc:
        log.error("ranker service cannot start: %s", exc)
        return 2
    except ListenError as exc:  # a port in use, or a host not this machine's
        log.error("ranker service cannot start: %s", exc.naming(named(ENV_PREFIX, exc.setting)))
        return 1
    except (RankerError, OSError) as exc:
        log.error("ranker service stopped: %s", exc)
        return 1
    return 0
