"""A service's settings from flags and environment variables, read only when its command runs.

A config is a frozen dataclass. Each field carries its help in `field(metadata=setting(...))` and gets a
flag (`max_batch` -> `--max-batch`) and a variable (`CTL_ENCODER_` + `MAX_BATCH`). `add_arguments` adds the
flags with default None, so that nothing is read from the environment while `ctl`'s parser is built (a
malformed variable of one service must not break every other command) and `from_args` can tell a flag given
from one absent: a flag wins over the variable, which wins over the field's default. A field without
`setting()` (a command's positional argument) is not a setting: no flag, no variable; the caller passes it.

A field may be optional (`int | None = None`: unset means "decided elsewhere", a preset, say): its flag and
variable read the inner type, and None passes its checks. A bool field takes a value (`--protect-health yes`)
unless it is a `switch`: then it is a pair of flags, `--augment` / `--no-augment`. Either way its variable
reads true/false, yes/no, on/off, 1/0. A `tuple[str, ...]` reads a comma-separated list.

A field may also carry a `check` (value -> what was expected, or None): `from_args` applies it naming the
flag or the variable the value came from, and the config's `__post_init__` applies it through `check_fields`
naming the field, so that a config built in code is held to the same rules. Whatever a field's check, a
float must be finite (NaN passes every `<` test and inf every `>=`), and a field with `choices` must hold
one of them (argparse checks a flag's choices, but not a variable's).

Numbers are read strictly: an int is ASCII digits with an optional sign, a float the same with a decimal
point and an exponent (or nan/inf, which the finite check then refuses by name). Python's int() and
float() also take underscores (`5_6099`), surrounding blanks and other scripts' digits, which turned a
typo or a quoting slip into a value.

An optional setting (`int | None`: None means "the preset's" or "not given") whose variable is set but
empty (or blank) is unset, as manifests and shells often leave a variable; elsewhere an empty variable is
read as the value it spells (false, no names, an empty string).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any


def parse_bool(text: str | bool) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


Check = Callable[[Any], str | None]


def setting(help: str, *, check: Check | None = None, switch: bool = False, **extra: Any) -> dict[str, Any]:
    """The metadata of one config field: its help, an optional check, whether a bool is a `switch`
    (`--x` / `--no-x` instead of `--x true`), and argparse extras (`choices`)."""
    metadata: dict[str, Any] = {"help": help, **extra}
    if check:
        metadata["check"] = check
    if switch:
        metadata["switch"] = True
    return metadata


# -------------------------------------------------------- checks: None if fine, else what is expected


def at_least(low: float) -> Check:
    """A finite number of at least `low`."""
    return lambda v: None if math.isfinite(v) and v >= low else f"expected {low} or more"


def more_than(low: float) -> Check:
    """A finite number above `low`."""
    return lambda v: None if math.isfinite(v) and v > low else f"expected a number above {low}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def in_range(low: float, high: float) -> Check:
    """A finite number from `low` to `high`, both included."""
    expected = f"expected {_number(low)}..{_number(high)}"
    return lambda v: None if math.isfinite(v) and low <= v <= high else expected


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda v: None if v in choices else f"expected one of {', '.join(choices)}"


GRPC_MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's limit on a message (a signed 32-bit length)


def message_size(value: int) -> str | None:
    """A gRPC message size limit: 1 byte up to gRPC's own limit."""
    return None if 1 <= value <= GRPC_MAX_MESSAGE_BYTES else f"expected 1..{GRPC_MAX_MESSAGE_BYTES}"


def tcp_port(*, off: bool = False) -> Check:
    """A TCP port, 0 for any free one; with `off`, -1 turns the listener off."""
    low = -1 if off else 0
    expected = "-1 (off), 0 (any free port) or a port up to 65535" if off else "0..65535"
    return lambda v: None if low <= v <= 65535 else f"expected {expected}"


def not_empty(value: str) -> str | None:
    return None if value.strip() else "expected a value"


# ---------------------------------------------------------------- strict numbers

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)", re.IGNORECASE
)


def parse_int(text: str) -> int:
    """An int from ASCII digits with an optional sign, nothing else (no `_`, no blanks, no `0x`)."""
    if not _INT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected int, got {text!r}")
    return int(text)


def parse_float(text: str) -> float:
    """A float written plainly (`2`, `-0.5`, `.5`, `1e3`; nan/inf are read, for the checks to name);
    no `_`, no blanks, no hexadecimal."""
    if not _FLOAT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected float, got {text!r}")
    return float(text)


def parse_names(text: str) -> tuple[str, ...]:
    """A comma-separated list (`a, b,,c` -> ('a', 'b', 'c')): blanks around names and empty names dropped."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


# ---------------------------------------------------------------- flags and variables


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(prefix: str, name: str) -> str:
    return prefix + name.upper()


def named(prefix: str, name: str) -> str:
    """Where field `name` is set, for a message: `--port / CTL_RANKER_PORT`."""
    return f"{flag(name)} / {env_var(prefix, name)}"


_PARSERS: dict[Any, Callable[[str], Any]] = {
    bool: parse_bool,
    int: parse_int,
    float: parse_float,
    tuple[str, ...]: parse_names,
}
_EXPECTED = {parse_bool: "true or false", parse_int: "int", parse_float: "float"}


def _settings(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are settings (they have a help); the others the caller passes itself."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _inner(hint: Any) -> tuple[Any, bool]:
    """A field's type without None, and whether None is allowed (`int | None` -> (int, True))."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        if len(kinds) == 1 and len(typing.get_args(hint)) == 2:
            return kinds[0], True
    return hint, False


def _parsers(cls: type) -> dict[str, Callable[[str], Any]]:
    """Each field's parser: a strict one for bool (bool("false") is True), int and float; else its type."""
    hints = typing.get_type_hints(cls)
    kinds = {f.name: _inner(hints[f.name])[0] for f in _settings(cls)}
    return {name: _PARSERS.get(kind, kind) for name, kind in kinds.items()}


def _optional(cls: type) -> set[str]:
    """The fields that may be None."""
    return {name for name, hint in typing.get_type_hints(cls).items() if _inner(hint)[1]}


def _expected(kind: Callable[[str], Any]) -> str:
    return _EXPECTED.get(kind) or getattr(kind, "__name__", str(kind))


def _problem(f: dataclasses.Field, value: Any, optional: bool) -> str | None:
    """What is wrong with `value` for field `f` (its choices, its check, a float that is not finite); None
    is fine for an optional field, and for no other."""
    if value is None:
        return None if optional else "expected a value"
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        return f"expected one of {', '.join(map(str, choices))}"
    check = f.metadata.get("check")
    problem = check(value) if check else None
    if problem is None and isinstance(value, float) and not math.isfinite(value):
        return "expected a finite number"
    return problem


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str, *, secrets: tuple[str, ...] = ("key", "token")
) -> None:
    """One flag per setting of `cls` (two for a switch), default None; the help names the variable and the
    field's default (unless it is None or empty: the help says what that means), except for fields whose
    name contains one of `secrets` (never printed)."""
    kinds = _parsers(cls)
    for f in _settings(cls):
        secret = any(word in f.name for word in secrets)
        shown = "" if secret or f.default in (None, "", ()) else f"; default {f.default}"
        help_text = f"{f.metadata['help']} (env {env_var(prefix, f.name)}{shown})".replace("%", "%%")
        if f.metadata.get("switch"):
            parser.add_argument(
                flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        parser.add_argument(
            flag(f.name),
            dest=f.name,
            type=kinds[f.name],
            choices=f.metadata.get("choices"),
            default=None,
            help=help_text,
        )


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _quoted(text: str, limit: int = 40) -> str:
    """A variable's text for a message: quoted, cut after `limit` characters (a message stays one line)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "…"


def from_args(
    cls: type,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None,
    prefix: str,
    error: type[Exception],
    **fixed: Any,
) -> Any:
    """`cls` from parsed flags, then `prefix`* variables (`environ`, default os.environ), then the field
    defaults; `fixed` holds the fields that are not settings. Raises `error` naming the flag (`--port=70000`)
    or the variable (`CTL_RANKER_PORT='abc'`) that is malformed or fails its field's check."""
    environ = os.environ if environ is None else environ
    kinds, optional = _parsers(cls), _optional(cls)
    values: dict[str, Any] = {}
    for f in _settings(cls):
        given = getattr(args, f.name, None)
        var = env_var(prefix, f.name)
        if given is not None:
            value, source = given, f"{flag(f.name)}={_shown(given)}"
        elif var in environ and not (f.name in optional and not environ[var].strip()):
            # an optional setting's empty variable is no value (the preset's or the default's, as unset)
            text = environ[var]
            source = f"{var}={_quoted(text)}"
            try:
                value = kinds[f.name](text)
            except (ValueError, argparse.ArgumentTypeError):
                raise error(f"{source}: expected {_expected(kinds[f.name])}") from None
        else:
            continue
        problem = _problem(f, value, f.name in optional)
        if problem:
            raise error(f"{source}: {problem}")
        values[f.name] = value
    return cls(**values, **fixed)


def check_fields(config: Any, error: type[Exception]) -> None:
    """Applies every field's check to `config` (from its `__post_init__`); `error` names the field."""
    optional = _optional(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = _problem(f, value, f.name in optional)
        if problem:
            raise error(f"{f.name}={value!r}: {problem}")
