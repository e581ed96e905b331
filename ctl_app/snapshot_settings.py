"""`ctl restore`'s settings (the limits it holds an archive to) and the errors of `ctl snapshot`/`restore`.

A module of its own so that `ctl`'s parser can add restore's flags without loading the store (qdrant-edge,
numpy): the snapshot job itself is `ctl_app.snapshot`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

from ctl import settings
from ctl.settings import at_least, setting

ENV_PREFIX = "CTL_RESTORE_"
MANIFEST = "ctl_snapshot.json"
KiB, MiB, GiB = 1024, 1024**2, 1024**3


class SnapshotError(Exception):
    """A snapshot cannot be taken or restored; the message says why and what to do."""


class RestoreConfigError(SnapshotError):
    """A restore limit (flag or CTL_RESTORE_* variable) is malformed; the message names it."""


@dataclass(frozen=True)
class RestoreLimits:
    """What `ctl restore` accepts from an archive, checked before anything is written; a genuine snapshot
    of a larger store needs larger values (the refusal names the flag and the variable)."""

    max_bytes: int = field(
        default=16 * GiB,
        metadata=setting(
            "the most bytes an archive may unpack to (its tar stream: files, headers, padding)",
            check=at_least(1),
        ),
    )
    max_members: int = field(
        default=10_000, metadata=setting("the most files and folders an archive may hold", check=at_least(2))
    )
    max_manifest_bytes: int = field(
        default=1 * MiB, metadata=setting(f"the largest {MANIFEST} accepted", check=at_least(64))
    )

    def __post_init__(self) -> None:
        settings.check_fields(self, RestoreConfigError)


def add_restore_arguments(parser: argparse.ArgumentParser) -> None:
    """`ctl restore`'s limit flags (`--max-bytes`, ...), each also read from CTL_RESTORE_* when it runs."""
    settings.add_arguments(parser, RestoreLimits, ENV_PREFIX)


def restore_limits(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> RestoreLimits:
    """The limits from flags, then CTL_RESTORE_* variables, then defaults; RestoreConfigError names a
    malformed one."""
    return settings.from_args(RestoreLimits, args, environ, ENV_PREFIX, RestoreConfigError)
