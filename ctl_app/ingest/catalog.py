"""Reading a product catalog: JSON lines or CSV, one product per record; and its image files.

Columns (JSON keys): `product_id` (or `id`), `category`, `image` (a file path, relative to the images
folder), and metadata: a `metadata` object in JSON lines, `metadata.KEY` columns in CSV, or any column
named with `--metadata-columns`. Anything else is an unknown column. A record that cannot be read is
yielded with its `problem` set, so that the job reports it instead of dropping it.

A catalog comes from outside and is read strictly, record by record, so that one bad record fails alone:
bytes are decoded as UTF-8 per record (a byte that is not UTF-8 fails its record; replacing it would
change the product id, and two different ids could become one), a record is at most MAX_RECORD_BYTES
(a longer one fails, skipped without being held in memory), a CSV field over csv's field limit fails its
record, and a record is reported at the line where it starts (a CSV record may span lines inside quotes).

Image files are read by `read_image` only, for the job and for `ctl recommend --html` alike.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ctl.terminal import printable
from encoder_service.config import EncoderConfig  # its limits only: no torch, no Pillow

FORMATS = ("jsonl", "csv")
ID_COLUMNS = ("product_id", "id")
REQUIRED = ("category", "image")
METADATA_PREFIX = "metadata."
MAX_RECORD_BYTES = 1 << 20  # one catalog record (a line of JSON, a CSV record with its quoted newlines)
MAX_IMAGE_BYTES = EncoderConfig.max_image_bytes  # the encoder's default limit on an encoded image
_BOM = "\xef\xbb\xbf"  # UTF-8's byte order mark, as read byte per character (Excel writes it)


@dataclass(frozen=True)
class CatalogRecord:
    """One product as the catalog gives it. `line`: where it starts in the file (1-based)."""

    line: int
    product_id: str
    category: str = ""
    image: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    problem: str = ""  # why it cannot be ingested; "" when it can


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (missing file, unknown format, no header)."""


class ImageFileError(Exception):
    """A record's image file cannot be sent; `code` is the record's status in the error report, the
    message names the file and the reason (never what the file holds)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def catalog_format(path: Path, given: str | None = None) -> str:
    if given:
        if given not in FORMATS:
            raise CatalogError(f"--format {given!r}: expected one of {', '.join(FORMATS)}")
        return given
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise CatalogError(
        f"{printable(path)}: cannot tell the format from the suffix {suffix!r}; give --format jsonl|csv"
    )


def read_catalog(
    path: Path, fmt: str | None = None, metadata_columns: tuple[str, ...] = ()
) -> Iterator[CatalogRecord]:
    """The catalog's records in file order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{printable(path)}: no such catalog file")
    reader = _read_csv if catalog_format(path, fmt) == "csv" else _read_jsonl
    # bytes as characters (latin-1 maps each byte to one), lines split at \n, \r\n and \r as csv expects;
    # each record is decoded as UTF-8 on its own
    with open(path, encoding="latin-1", newline="") as f:
        if f.read(len(_BOM)) != _BOM:
            f.seek(0)
        yield from reader(path, f, metadata_columns)


def _read_jsonl(path: Path, f: io.TextIOBase, metadata_columns: tuple[str, ...]) -> Iterator[CatalogRecord]:
    for number, raw, problem in _records(f, csv_quotes=False):
        text, problem = _decoded(raw, number, problem)
        if problem:
            yield CatalogRecord(number, "", problem=problem)
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except (ValueError, RecursionError) as exc:
            yield CatalogRecord(number, _guess_id(text), problem=_json_problem(exc))
            continue
        if not isinstance(row, dict):
            yield CatalogRecord(number, "", problem="not a JSON object")
            continue
        metadata = row.pop("metadata", {})
        if not isinstance(metadata, dict):
            product_id = _text(row.get("product_id", row.get("id")))
            yield CatalogRecord(number, product_id, problem="metadata: expected an object of strings")
            continue
        yield _record(number, row, dict(metadata), metadata_columns)


def _json_problem(exc: ValueError | RecursionError) -> str:
    """Why json could not read a line, for the error report: whatever it raises (malformed JSON, a number
    of more digits than Python converts, nesting deeper than its recursion limit) fails that record alone."""
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON: {exc.msg}"
    if isinstance(exc, RecursionError):
        return "JSON not read: arrays or objects nested too deeply"
    if "integer string conversion" in str(exc):
        return f"JSON not read: a number has more than {sys.get_int_max_str_digits()} digits"
    return f"not valid JSON: {exc}"


def _read_csv(path: Path, f: io.TextIOBase, metadata_columns: tuple[str, ...]) -> Iterator[CatalogRecord]:
    header: list[str] | None = None
    for number, raw, problem in _records(f, csv_quotes=True):
        text, problem = _decoded(raw, number, problem)
        row: list[str] = []
        if not problem:
            try:
                row = next(csv.reader([text]), [])
            except csv.Error as exc:
                problem = f"not valid CSV: {exc}"
            if not problem and not any(cell.strip() for cell in row):
                continue
        if header is None:
            if problem:
                raise CatalogError(f"{printable(path)}: the header (line {number}): {problem}")
            header = [h.strip() for h in row]
            continue
        if problem:
            yield CatalogRecord(number, "", problem=problem)
            continue
        values = dict(zip(header, row))
        if len(row) != len(header):
            yield CatalogRecord(
                number,
                _text(values.get("product_id", values.get("id"))),
                problem=f"{len(row)} fields where the header has {len(header)}",
            )
            continue
        metadata = {k[len(METADATA_PREFIX) :]: v for k, v in values.items() if k.startswith(METADATA_PREFIX)}
        plain = {k: v for k, v in values.items() if not k.startswith(METADATA_PREFIX)}
        yield _record(number, plain, metadata, metadata_columns)
    if header is None:
        raise CatalogError(f"{printable(path)}: empty CSV (expected a header: product_id,category,image,...)")


def _records(f: io.TextIOBase, csv_quotes: bool) -> Iterator[tuple[int, str, str]]:
    """(first line, text, problem) of each record: a line, or with `csv_quotes` a CSV record, which goes on
    over line ends inside quotes. A record over MAX_RECORD_BYTES is read to its end but not kept (text "",
    problem set); so is one whose quotes are still open at the end of the file."""
    number = 0
    while line := f.readline(MAX_RECORD_BYTES + 1):
        number += 1
        first, parts, size, state = number, [], 0, _START
        while True:
            size += len(line)
            if size <= MAX_RECORD_BYTES:
                parts.append(line)
            if csv_quotes:
                state = _csv_state(line, state)
            ended = line.endswith(("\n", "\r"))  # else a piece of a long line, or the file's last line
            if ended and state != _QUOTED:
                break
            line = f.readline(MAX_RECORD_BYTES + 1)
            if not line:
                break
            number += ended
        if size > MAX_RECORD_BYTES:
            lines = f"line {first}" if number == first else f"lines {first}-{number}"
            yield first, "", f"record over {MAX_RECORD_BYTES} bytes ({lines}): not read"
        elif state == _QUOTED:
            yield (
                first,
                "",
                f"a quoted field opened here is not closed before the end of the file (line {number})",
            )
        else:
            yield first, "".join(parts), ""


# The states of csv's reader (excel dialect: ',' between fields, '"' around one, '""' inside it) that
# decide where a record ends: outside quotes a line end ends it.
_START, _PLAIN, _QUOTED, _QUOTE = range(4)  # a field's start, unquoted field, quoted field, '"' seen in one


def _csv_state(text: str, state: int) -> int:
    """The reader's state after `text`, from `state`: as csv reads, a quote opens a field only at its
    start, '""' inside one is a quote, and a character after the closing quote continues the field."""
    i, n = 0, len(text)
    while i < n:
        if state == _QUOTED:
            j = text.find('"', i)
            if j < 0:
                return _QUOTED
            state, i = _QUOTE, j + 1
        elif state == _QUOTE:
            state = {'"': _QUOTED, ",": _START}.get(text[i], _PLAIN)
            i += 1
        elif state == _START and text[i] == '"':
            state, i = _QUOTED, i + 1
        else:
            j = text.find(",", i)
            if j < 0:
                return _PLAIN
            state, i = _START, j + 1
    return state


def _decoded(raw: str, first: int, problem: str) -> tuple[str, str]:
    """A record's text decoded strictly as UTF-8, or why it cannot be (naming the first bad byte's line)."""
    if problem:
        return "", problem
    try:
        return raw.encode("latin-1").decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        before = re.split(r"\r\n|\r|\n", raw[: exc.start])
        where = f"line {first + len(before) - 1}, byte {len(before[-1]) + 1}"
        return "", f"not valid UTF-8 (byte 0x{ord(raw[exc.start]):02x} at {where}): save the catalog as UTF-8"


def _record(number: int, row: dict, metadata: dict, metadata_columns: tuple[str, ...]) -> CatalogRecord:
    product_id = _text(row.get("product_id", row.get("id")))
    for name in metadata_columns:
        if name in row:
            metadata[name] = row.pop(name)
    known = {*ID_COLUMNS, *REQUIRED}
    unknown = sorted(k for k in row if k not in known)
    problems = []
    if unknown:
        problems.append(
            f"unknown column {', '.join(map(repr, unknown))} (known: product_id, category, image; "
            "metadata goes in 'metadata' / 'metadata.KEY' or is named with --metadata-columns)"
        )
    if "product_id" in row and "id" in row:
        problems.append("both 'product_id' and 'id' given")
    if not product_id:
        problems.append("product_id is missing or empty")
    for name in REQUIRED:
        if not _text(row.get(name)):
            problems.append(f"{name} is missing or empty")
    bad_meta = sorted(k for k, v in metadata.items() if not isinstance(v, str | int | float | bool))
    if bad_meta:
        problems.append(f"metadata {', '.join(map(repr, bad_meta))}: values must be strings or numbers")
    image = _text(row.get("image"))
    if "://" in image:
        problems.append(f"image {image!r} is a URL: give a file path (images are not downloaded)")
    texts = [
        product_id,
        _text(row.get("category")),
        image,
        *map(str, metadata),
        *map(_text, metadata.values()),
    ]
    if not all(_unicode(t) for t in texts):  # JSON's \ud800 escapes: no UTF-8 for the ranker
        problems.append("a value holds a lone surrogate (a \\ud800-\\udfff escape): not valid Unicode")
    return CatalogRecord(
        line=number,
        product_id=product_id,
        category=_text(row.get("category")),
        image=image,
        metadata={str(k): _text(v) for k, v in metadata.items()},
        problem="; ".join(problems),
    )


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value).strip()
    return ""


def _guess_id(line: str) -> str:
    """A broken JSON line's product id, if one can be seen (for the error report)."""
    for key in ID_COLUMNS:
        marker = f'"{key}"'
        at = line.find(marker)
        if at >= 0:
            rest = line[at + len(marker) :].lstrip(" :")
            if rest.startswith('"'):
                return rest[1:].split('"', 1)[0]
    return ""


# ------------------------------------------------------------------------------------------ image files

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
# a folder on the way to an image: opened to look names up in (O_PATH: search permission is enough), never
# through a link
_FOLDER_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40  # links followed in one path at most, as the kernel's own lookup (then ELOOP)


def read_image(
    root: Path, reference: str, *, allow_outside: bool = False, max_bytes: int = MAX_IMAGE_BYTES
) -> bytes:
    """The bytes of the image file a catalog names (`reference`, relative to `root`), if it is a regular
    file of 1 to `max_bytes` bytes that lies under `root` once every link is followed (`allow_outside`
    lifts that last rule only). Raises ImageFileError naming the file and the reason.

    A catalog is not trusted to name only its images: `../`, an absolute path or a link could name any
    file the job can read (/proc/self/environ, a key), a device (/dev/zero never ends) or a pipe (blocks
    forever). So the path is walked under the root one name at a time (`_open_under`), the file is opened
    without following a link (O_NOFOLLOW) or blocking (O_NONBLOCK), and its kind and size are taken from
    the open file (fstat), before reading at most `max_bytes` + 1 bytes."""
    path = os.path.join(root, reference)
    shown = repr(path)
    try:
        if allow_outside:  # anywhere: by its real path
            real = os.path.realpath(path)
            before = os.stat(real)  # a device or a pipe is refused before it is opened
            _check_kind(before, shown, max_bytes)
            fd = os.open(real, _OPEN_FLAGS)
        else:
            fd, before = _open_under(os.fspath(root), os.fspath(reference), shown, max_bytes)
    except ValueError as exc:  # a NUL byte in the path
        raise ImageFileError("INVALID_ARGUMENT", f"image {shown}: not a valid path ({exc})") from None
    except OSError as exc:
        raise _os_error(exc, shown) from None
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            raise ImageFileError("UNAVAILABLE", f"image {shown} was replaced while it was opened")
        _check_kind(opened, shown, max_bytes)
        data = bytearray()
        while len(data) <= max_bytes and (chunk := os.read(fd, max_bytes + 1 - len(data))):
            data += chunk
    except OSError as exc:
        raise _os_error(exc, shown) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageFileError(
            "INVALID_ARGUMENT", f"image {shown} grew over the limit of {max_bytes} bytes while read"
        )
    if not data:
        raise ImageFileError("INVALID_ARGUMENT", f"image {shown} is an empty file")
    return bytes(data)


def _open_under(root: str, reference: str, shown: str, max_bytes: int) -> tuple[int, os.stat_result]:
    """Opens the file `reference` names under `root` (the open file, and its lstat), or refuses it.

    Checking a real path (realpath) and then opening it let a folder on the way be swapped for a link
    in between (O_NOFOLLOW guards the last name only). So the walk opens one name at a time, each in the
    folder opened before it (dir_fd) and none through a link: a link met on the way is read (readlink)
    and its target walked the same way, from its own folder (or from '/' when absolute); `..` goes back to
    the folder opened before it. The walk may pass above the root only on the root's own path back down
    (`../images/x.jpg`; an absolute path through the root's real path, or through the path given as
    --images): any other name there is outside, refused before anything outside is opened."""
    home = os.path.realpath(root)
    home_parts, given_parts = _parts(home), _parts(os.path.abspath(root))
    folders = [os.open(home, _FOLDER_FLAGS)]  # the root, then each folder below it on the walk
    at = list(home_parts)  # where the walk is: the names from '/', physical (no link among them)
    pending: list[str] = []  # names still to walk, the next one last
    links = 0

    def go(path: str) -> None:  # walk `path` next: from where the walk is, or from '/' when absolute
        nonlocal at
        parts = path.split("/")
        if path.startswith("/"):
            while len(folders) > 1:
                os.close(folders.pop())
            parts = _parts(path)
            at = list(home_parts) if parts[: len(given_parts)] == given_parts else []
            parts = parts[len(given_parts) :] if at else parts
        pending.extend(reversed(parts))

    try:
        go(reference)
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(at) > len(home_parts):
                    os.close(folders.pop())
                del at[-1:]
                continue
            if len(at) < len(home_parts):  # above the root: only the root's own path leads back in
                if name != home_parts[len(at)]:
                    gone = "/" + "/".join([*at, name, *reversed(pending)])
                    raise ImageFileError(
                        "PERMISSION_DENIED",
                        f"image {shown} is outside the images folder {home!r} (it leads to {gone!r}): give "
                        "--images, or --allow-images-outside to read it anyway",
                    )
                at.append(name)
                continue
            folder = folders[-1]
            if pending:  # a folder on the way
                try:
                    folders.append(os.open(name, _FOLDER_FLAGS, dir_fd=folder))
                    at.append(name)
                    continue
                except OSError as exc:  # ENOTDIR for a link, or for a file named as a folder
                    target = _link(name, folder, exc)
            else:
                before = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if not stat.S_ISLNK(before.st_mode):
                    _check_kind(before, shown, max_bytes)  # a device or a pipe is refused unopened
                    return os.open(name, _OPEN_FLAGS, dir_fd=folder), before
                target = os.readlink(name, dir_fd=folder)
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            go(target)
        raise ImageFileError("INVALID_ARGUMENT", f"image {shown} is a directory, not a regular file")
    finally:
        for fd in folders:
            os.close(fd)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _link(name: str, folder: int, failed: OSError) -> str:
    """The target of the link `name` in `folder`; `failed` (why it did not open as a folder) if no link."""
    try:
        return os.readlink(name, dir_fd=folder)
    except OSError:
        raise failed from None


def _check_kind(st: os.stat_result, shown: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ImageFileError("INVALID_ARGUMENT", f"image {shown} is {kind}, not a regular file")
    if st.st_size == 0:  # also /proc's files, which say 0 whatever they hold
        raise ImageFileError("INVALID_ARGUMENT", f"image {shown} is an empty file")
    if st.st_size > max_bytes:
        raise ImageFileError(
            "INVALID_ARGUMENT",
            f"image {shown} is {st.st_size} bytes, over the limit of {max_bytes} bytes (the encoder's "
            "--max-image-bytes)",
        )


def _os_error(exc: OSError, shown: str) -> ImageFileError:
    code = {
        errno.ENOENT: "NOT_FOUND",
        errno.ENOTDIR: "NOT_FOUND",
        errno.EACCES: "PERMISSION_DENIED",
        errno.EPERM: "PERMISSION_DENIED",
        errno.ELOOP: "INVALID_ARGUMENT",  # a link put in place after the path was resolved
    }.get(exc.errno, "UNAVAILABLE")
    return ImageFileError(code, f"image {shown}: {exc.strerror or exc}")
