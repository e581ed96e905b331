"""`ctl serve-encoder`: the encoder gRPC service, configured by flags or CTL_ENCODER_* variables."""

from __future__ import annotations

import argparse
import logging

from encoder_service.config import ENV_PREFIX, add_arguments, from_args
from encoder_service.errors import ConfigError, EncoderError

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `serve-encoder` (its flags from EncoderConfig) to the `ctl` subcommands; sets func=main."""
    parser = subparsers.add_parser(
        "serve-encoder",
        help="serve the style encoders over gRPC (ctl.v1.EncoderService)",
        description="Serves ctl.v1.EncoderService: image bytes in, style embeddings out. Every flag also "
        "reads a CTL_ENCODER_* environment variable; a flag given wins.",
    )
    add_arguments(parser)
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Runs the service until SIGTERM/SIGINT; 0 after a clean stop, 2 for a bad setting, 1 if the model
    cannot be served or a port cannot be bound. Logging is set up by the caller (`ctl`)."""
    from ctl.lifecycle import serve_command
    from encoder_service.server import run

    return serve_command(
        "encoder service",
        lambda: from_args(args),
        run,
        config_error=ConfigError,
        service_error=EncoderError,
        env_prefix=ENV_PREFIX,
        logger=log,
    )
