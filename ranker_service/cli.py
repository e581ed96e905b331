"""`ctl serve-ranker`: the ranker service's command, configured by flags or CTL_RANKER_* variables."""

from __future__ import annotations

import argparse
import logging

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
    from ctl.lifecycle import serve_command
    from ranker_service.server import run

    return serve_command(
        "ranker service",
        lambda: from_args(args),
        run,
        config_error=ConfigError,
        service_error=RankerError,
        env_prefix=ENV_PREFIX,
        logger=log,
    )
