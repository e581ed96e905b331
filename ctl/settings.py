"""A service's settings from flags and environment variables, read only when its command runs.

A config is a frozen dataclass. Each field carries its help in `field(metadata=setting(...))` and gets a
flag (`max_batch` -> `--max-batch`) and a variable (`CTL_ENCODER_` + `MAX_BATCH`). `add_arguments` adds the
flags with default None, so that nothing is read from the environment while `ctl`'s parser is built (a
malformed variable of one service must not break every other command) and `from_args` can tell a flag given
from one absent: a flag wins over the variable, which wins over the field's default.

A field may also carry a `check` (value -> what was expected, or None): `from_args` applies it naming the
flag or the variable the value came from, and the config's `__post_init__` applies it through `check_fields`
naming the field, so that a config built in code is held to the same rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any

from ctl.serving import parse_bool

Check = Callable[[Any], str | None]


def setting(help: str, *, check: Check | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata of one config field: its help, an optional check, and argparse extras (`choices`)."""
    return {"help": help, **({"check": check} if check else {}), **extra}


# -------------------------------------------------------- checks: None if fine, else what is expected


def at_least(low: float) -> Check:
    """A finite number of at least `low`."""
    return lambda v: None if math.isfinite(v) and v >= low else f"expected {low} or more"


def more_than(low: float) -> Check:
    """A finite number above `low`."""
    return lambda v: None if math.isfinite(v) and v > low else f"expected a number above {low}"


def tcp_port(*, off: bool = False) -> Check:
    """A TCP port, 0 for any free one; with `off`, -1 turns the listener off."""
    low = -1 if off else 0
    expected = "-1 (off), 0 (any free port) or a port up to 65535" if off else "0..65535"
    return lambda v: None if low <= v <= 65535 else f"expected {expected}"


def not_empty(value: str) -> str | None:
    return None if value.strip() else "expected a value"


# ---------------------------------------------------------------- flags and variables


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(prefix: str, name: str) -> str:
    return prefix + name.upper()


def _parsers(cls: type) -> dict[str, Callable[[str], Any]]:
    """Each field's parser: its type, or parse_bool for booleans (bool("false") is True)."""
    return {name: parse_bool if kind is bool else kind for name, kind in typing.get_type_hints(cls).items()}


def _expected(kind: Callable[[str], Any]) -> str:
    return "true or false" if kind is parse_bool else getattr(kind, "__name__", str(kind))


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str, *, secrets: tuple[str, ...] = ("key", "token")
) -> None:
    """One flag per field of `cls`, default None; the help names the variable and the field's default,
    except for fields whose name contains one of `secrets` (never printed)."""
    kinds = _parsers(cls)
    for f in dataclasses.fields(cls):
        shown = "" if any(word in f.name for word in secrets) else f"; default {f.default}"
        help_text = f"{f.metadata['help']} (env {env_var(prefix, f.name)}{shown})"
        parser.add_argument(
            flag(f.name),
            dest=f.name,
            type=kinds[f.name],
            choices=f.metadata.get("choices"),
            default=None,
            help=help_text.replace("%", "%%"),
        )


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def from_args(
    cls: type,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None,
    prefix: str,
    error: type[Exception],
) -> Any:
    """`cls` from parsed flags, then `prefix`* variables (`environ`, default os.environ), then the field
    defaults. Raises `error` naming the flag (`--port=70000`) or the variable (`CTL_RANKER_PORT='abc'`)
    that is malformed or fails its field's check."""
    environ = os.environ if environ is None else environ
    kinds = _parsers(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        var = env_var(prefix, f.name)
        if given is not None:
            value, source = given, f"{flag(f.name)}={_shown(given)}"
        elif var in environ:
            text = environ[var]
            source = f"{var}={text!r}"
            try:
                value = kinds[f.name](text)
            except (ValueError, argparse.ArgumentTypeError):
                raise error(f"{source}: expected {_expected(kinds[f.name])}") from None
        else:
            continue
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise error(f"{source}: {problem}")
        values[f.name] = value
    return cls(**values)


def check_fields(config: Any, error: type[Exception]) -> None:
    """Applies every field's check to `config` (from its `__post_init__`); `error` names the field."""
    for f in dataclasses.fields(config):
        check = f.metadata.get("check")
        value = getattr(config, f.name)
        problem = check(value) if check else None
        if problem:
            raise error(f"{f.name}={value!r}: {problem}")
