"""The embedded store's own record, `ctl_store.json` ({"model_version", "dim"}), read strictly.

The ranker writes the record when it creates a store (edge.py) and trusts it when it opens one. A store
that is archived or restored (`ctl snapshot`, `ctl restore`) is not vouched for, so its record is read here
by stricter rules: bounded size, JSON without a key twice, the expected fields, types and ranges, and a
model version that can name the store's folder (`{model_version}` in a store path). A snapshot's manifest
carries the same fields and is read by the same rules (`parse_json`, `integer`, `model_version`, ...),
which raise RecordError with a reason for the caller to prefix with what it read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ranker_service.errors import StoreError

META_FILE = "ctl_store.json"

KiB, MiB, GiB = 1024, 1024**2, 1024**3
META_BYTES = 64 * KiB  # the largest record read
MAX_EMBEDDING_DIM = 65536

# A model version names a folder: no separators, no `.`/`..`, no control characters (export's are hex).
MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RecordError(Exception):
    """A record (the store's, or a manifest) is not what it should be; the message says what."""


class StoreFileError(StoreError):
    """A store's files cannot be read, opened or copied as they are; the message says why and what to do."""


@dataclass(frozen=True)
class StoreRecord:
    """What a store records of itself: the model version of its vectors, and their dimension D."""

    model_version: str
    embedding_dim: int


def read_record(store_dir: Path, shown: str) -> StoreRecord:
    """The record of the store at `store_dir`, checked like a manifest's (a version that names no folder
    would make an archive no restore accepts). StoreFileError names the store as `shown`."""
    try:
        with open(store_dir / META_FILE, "rb") as f:
            data = f.read(META_BYTES + 1)
    except FileNotFoundError:
        raise StoreFileError(f"{shown} is not an embedded ctl store (no {META_FILE})") from None
    except OSError as exc:
        raise StoreFileError(f"cannot read {shown}/{META_FILE}: {exc.strerror}") from exc
    try:
        if len(data) > META_BYTES:
            raise RecordError(f"larger than {size_text(META_BYTES)}")
        meta = parse_json(data)
        if not isinstance(meta, dict):
            raise RecordError(f"holds {json_kind(meta)}, expected an object")
        return StoreRecord(model_version(meta), integer(meta, "dim", 1, MAX_EMBEDDING_DIM))
    except RecordError as exc:
        raise StoreFileError(f"{shown}/{META_FILE} is not a ctl store record: {exc}") from None


# ---------------------------------------------------------------- the rules, for the record and a manifest


def shown(value: Any, limit: int = 60) -> str:
    """A value read from a file, for a one-line message: repr, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def size_text(n: int) -> str:
    """A number of bytes, for a message: `64.0 KiB`, `100 bytes`."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise RecordError("a key appears twice in one object")
    return dict(pairs)


def parse_json(data: bytes) -> Any:
    """UTF-8 JSON in which no object holds a name twice; RecordError otherwise (too deep included)."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RecordError(f"not JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def json_kind(value: Any) -> str:
    """What a JSON value is, in words: `an object`, `an integer`, `null`."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    for kind, words in ((dict, "an object"), (list, "an array"), (str, "a string"), (int, "an integer")):
        if isinstance(value, kind):
            return words
    return "a number" if isinstance(value, float) else type(value).__name__


def integer(record: dict, name: str, low: int, high: int) -> int:
    """The field `name` of `record`: an integer (not a bool) from `low` to `high`."""
    value = record.get(name)
    if type(value) is not int or not low <= value <= high:
        said = shown(value) if name in record else "missing"
        raise RecordError(f"{name} is {said}, expected an integer from {low} to {high}")
    return value


def model_version(record: dict) -> str:
    """The record's `model_version`, one that can name a folder (MODEL_VERSION)."""
    value = record.get("model_version")
    if not isinstance(value, str) or not MODEL_VERSION.fullmatch(value):
        raise RecordError(
            f"model_version is {shown(value) if 'model_version' in record else 'missing'}, expected "
            "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value
