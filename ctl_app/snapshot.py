"""`ctl snapshot` / `ctl restore`: the embedded catalog as one archive, and back.

qdrant-edge cannot snapshot a live shard from Python, and its write-ahead log locks the directory while a
ranker has it open; so a snapshot is taken of a store no ranker holds (stop the ranker, or snapshot a
replica's copy): the store is opened (which proves nobody else has it and replays its log), flushed and
closed, then archived as a .tar.gz with a manifest (model version, dimension, products per category).
A store that holds a link, a file of more than one name (a hard link) or a special file is refused rather
than archived (each could carry a file from outside the store into the archive), and so is one holding a
name restore refuses (the same rules, `_name_fault`).

Restore treats the archive as hostile until proven otherwise, and unpacks with its own code rather than
tarfile's extraction (whose "data" filter is bypassable on unpatched Pythons, CVE-2025-4517, and missing
on some: Debian's 3.11.2), so it is equally safe on every Python ctl supports:
1. every member header is read and checked before anything is written: only regular files and folders,
   named `ctl_snapshot.json` or under `store/` (no absolute names, `..`, empty parts, duplicates, control
   characters), each folder declared before what it holds, no more than `--max-members` of them, their
   sizes within `--max-bytes` and the free space where the store goes. While tarfile parses a header,
   it may read at most HEADER_BYTES of well-formed header material (older Pythons parse pax headers with
   regular expressions that backtrack quadratically, CVE-2024-6232), and the decompressed stream can
   never be read past `--max-bytes` (a gzip bomb stops there);
2. the manifest (at most `--max-manifest-bytes`) must be a JSON object of the expected fields and types,
   with a model version of letters, digits, `.`, `_` and `-` (MODEL_VERSION), which decides the folder:
   it must not exist and must lie under the template's fixed part (`ctl-store/` of the default);
3. the members are written into a fresh staging folder beside the target, each file created anew
   (O_EXCL, never through a link), the bytes counted as they are written;
4. the restored store is opened and must hold what the manifest says (a damaged one that makes the engine
   panic is refused like any other); only then is it moved into place.
Any failure removes the staging folder and the parent folders the restore created, and the message names
the archive and the target, never the staging folder.

A Qdrant server has its own snapshots (POST /collections/NAME/snapshots; deploy/qdrant/values.yaml keeps
a snapshot volume), which these commands do not replace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctl import settings
from ctl.settings import at_least, setting

log = logging.getLogger(__name__)

MANIFEST = "ctl_snapshot.json"
STORE = "store"
FORMAT = 1
PLACEHOLDER = "{model_version}"

# A model version names a folder: no separators, no `.`/`..`, no control characters (export's are hex).
MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

KiB, MiB, GiB = 1024, 1024**2, 1024**3
HEADER_BYTES = 8 * KiB  # tar header material per member (ustar block, pax records, GNU long name)
NAME_BYTES = 1024  # a member's name, UTF-8
PART_BYTES = 255  # one part of it (NAME_MAX)
CATEGORY_BYTES = 1024  # a category in the manifest (the ranker takes 512)
META_BYTES = 64 * KiB  # the store's own ctl_store.json
CHUNK = 256 * KiB  # bytes copied per read
BLOCK = 4096  # what a file or folder takes on disk at least, for the free-space estimate
ENV_PREFIX = "CTL_RESTORE_"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # and lone surrogates: bytes not UTF-8
_LONG_NUMBER = re.compile(rb"[0-9]{33}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotError(Exception):
    """A snapshot cannot be taken or restored; the message says why and what to do."""


class RestoreConfigError(SnapshotError):
    """A restore limit (flag or CTL_RESTORE_* variable) is malformed; the message names it."""


class _Refused(Exception):
    """The archive is not restored; `restore` prefixes the archive's name to the reason."""


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


def _named(name: str) -> str:
    return settings.named(ENV_PREFIX, name)


def _shown(value: Any, limit: int = 60) -> str:
    """A value from the archive, for a one-line message: repr, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _size(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------- the store's own record


def _store_meta(store_dir: Path, shown: str) -> tuple[str, int]:
    """The model version and dimension the store records, checked like a manifest's (a version that names
    no folder would make an archive no restore accepts)."""
    from ranker_service.store.edge import META_FILE

    try:
        with open(store_dir / META_FILE, "rb") as f:
            data = f.read(META_BYTES + 1)
    except FileNotFoundError:
        raise SnapshotError(f"{shown} is not an embedded ctl store (no {META_FILE})") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read {shown}/{META_FILE}: {exc.strerror}") from exc
    try:
        if len(data) > META_BYTES:
            raise _Refused(f"larger than {_size(META_BYTES)}")
        meta = _parse_json(data)
        if not isinstance(meta, dict):
            raise _Refused(f"holds {_json_kind(meta)}, expected an object")
        return _version(meta), _integer(meta, "dim", 1, 65536)
    except _Refused as exc:
        raise SnapshotError(f"{shown}/{META_FILE} is not a ctl store record: {exc}") from None


# What `_inventory` lets through: the caller's interruptions. Anything else the engine raises is about the
# store, a panic included (pyo3_runtime.PanicException, a BaseException: a damaged shard makes qdrant-edge
# index past a file's end).
_NOT_ENGINE_FAULTS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


def _flush_stderr() -> None:
    """Flushes Python's stderr, if there is one (None when fd 2 was closed at start) and it can be written."""
    with contextlib.suppress(OSError, ValueError):
        if sys.stderr is not None:
            sys.stderr.flush()


def _held_file() -> io.BufferedRandom | io.BufferedWriter:
    """Where fd 2 points while the engine runs: a temporary file, or /dev/null if none can be made (then
    the engine's report is dropped, not passed on: holding it is never a reason to fail)."""
    try:
        return tempfile.TemporaryFile()
    except OSError:
        return open(os.devnull, "wb")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _engine_report() -> Iterator[None]:
    """Holds what is written to stderr (file descriptor 2) while the engine has a store open: a panic's
    report (the Rust hook prints the message, a source line and maybe a backtrace) is dropped, as the
    SnapshotError says it in one line; anything else is passed on afterwards, in order, as far as stderr
    takes it (closed, full or a pipe nobody reads: dropped, never a failure of the snapshot). fd 2 points
    at the held file even when it was closed, so that no file the engine opens takes its number (a report
    would be written into it); it is closed again afterwards. A process started without fd 2 (no
    sys.__stderr__) whose number another file has taken since (asyncio's epoll, say) is left alone: that
    file is not stderr. Other threads' output in the meantime is held too (ctl snapshot and restore run
    none)."""
    _flush_stderr()
    if sys.__stderr__ is None and _is_open(2):
        yield
        return
    try:
        saved: int | None = os.dup(2)
    except OSError:
        saved = None  # fd 2 is closed (`2>&-`, a service manager without stderr)
    keep = False
    try:
        with _held_file() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
                keep = True
            except BaseException as exc:
                keep = isinstance(exc, (Exception, *_NOT_ENGINE_FAULTS))
                raise
            finally:
                _flush_stderr()
                if saved is None:
                    if held.fileno() != 2:  # (the held file took the free number itself: closed below)
                        os.close(2)
                else:
                    os.dup2(saved, 2)
                if keep and saved is not None and held.readable():
                    _pass_on(held)
    finally:
        if saved is not None:
            os.close(saved)


def _pass_on(held: io.BufferedRandom) -> None:
    """Copies the held output to stderr, best effort: what stderr does not take is dropped."""
    with contextlib.suppress(OSError, ValueError):
        held.seek(0)
        with open(2, "wb", closefd=False) as stderr:
            shutil.copyfileobj(held, stderr)


async def _inventory(store_dir: Path, shown: str) -> dict:
    """Opens the store (proving no ranker holds it), reads what it holds, flushes and closes it. Messages
    name the store as `shown` (restore's staging folder is gone by the time anyone reads them)."""
    from ranker_service.store import open_edge_store

    version, dim = _store_meta(store_dir, shown)
    try:
        with _engine_report():
            store = await open_edge_store(store_dir, version, dim)
            try:
                counts = await store.counts_by_category()
            finally:
                await store.close()
    except _NOT_ENGINE_FAULTS:
        raise
    except BaseException as exc:  # the engine's own errors, and its panic on a damaged shard
        reason = (str(exc) or type(exc).__name__).replace(str(store_dir), shown).replace("\n", " ")
        if not isinstance(exc, Exception):
            reason = f"qdrant-edge panicked ({reason[:200]}): the store is damaged"
        raise SnapshotError(f"cannot open {shown}: {reason}") from exc
    return {
        "format": FORMAT,
        "model_version": version,
        "dim": dim,
        "products": sum(counts.values()),
        "products_by_category": dict(sorted(counts.items())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------- snapshot


_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _file_kind(mode: int, link: str = "?") -> str:
    """What a file in the store is, in words (as `_kind` says it of a member)."""
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {_shown(link)})"
    for test, words in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return f"of file type {stat.S_IFMT(mode):#o}"


def _not_plain(where: Path, mode: int, link: str = "?") -> SnapshotError:
    return SnapshotError(
        f"{where} is {_file_kind(mode, link)}: a snapshot holds only regular files and folders "
        "(move it out of the store, or copy what it points to into it)"
    )


def _changed(where: Path, parent: int, part: str) -> SnapshotError:
    """A name that is no longer what it was when checked (someone writes to the store meanwhile)."""
    try:
        now = _file_kind(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        now = "gone"
    return SnapshotError(
        f"{where} changed while it was archived (now {now}): stop whatever writes to the store, "
        "then take the snapshot again"
    )


def _member(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """A member from a descriptor's fstat: a folder or a regular file, its mode, size and mtime; no owner."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if stat.S_ISDIR(st.st_mode) else tarfile.REGTYPE
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.size = st.st_size if info.type == tarfile.REGTYPE else 0
    return info


class _Exact:
    """A regular file's bytes as tarfile reads them for a member: exactly `size`; a file that ends before
    (it shrank while read) is refused rather than archived short (tarfile would fail mid-member)."""

    def __init__(self, fd: int, size: int, where: Path) -> None:
        self._fd, self._left, self._where = fd, size, where

    def read(self, size: int) -> bytes:
        size = min(size, self._left)
        parts = []
        while size:
            try:
                chunk = os.read(self._fd, size)
            except OSError as exc:
                raise SnapshotError(f"cannot read {self._where}: {exc.strerror}") from exc
            if not chunk:
                raise SnapshotError(
                    f"{self._where} shrank while it was archived: stop whatever writes to the store, "
                    "then take the snapshot again"
                )
            parts.append(chunk)
            size -= len(chunk)
            self._left -= len(chunk)
        return b"".join(parts)

    def grew(self) -> bool:
        """Whether the file holds more than `size` bytes now (it grew while read)."""
        try:
            return bool(os.read(self._fd, 1))
        except OSError as exc:
            raise SnapshotError(f"cannot read {self._where}: {exc.strerror}") from exc


def _add_file(tar: tarfile.TarFile, parent: int, part: str, name: str, where: Path) -> None:
    """Archives the regular file `part` of the folder open as `parent`: opened without following a link
    (O_NOFOLLOW) and without blocking on a FIFO, then checked as opened (fstat: a regular file of one
    name) and archived from that descriptor, so that what is archived is what was checked."""
    try:
        fd = os.open(part, _FILE_FLAGS, dir_fd=parent)
    except OSError as exc:  # ELOOP: a link now; ENXIO: a socket; ENOENT: gone
        raise _changed(where, parent, part) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _changed(where, parent, part)
        if st.st_nlink > 1:
            raise SnapshotError(
                f"{where} is a hard link (one of {st.st_nlink} names of a file, which may lie outside the "
                "store): a snapshot holds only files of one name (replace it with a copy)"
            )
        source = _Exact(fd, st.st_size, where)
        tar.addfile(_member(name, st), source)
        if source.grew():
            raise SnapshotError(
                f"{where} grew while it was archived: stop whatever writes to the store, "
                "then take the snapshot again"
            )
    finally:
        os.close(fd)


@dataclass
class _Folder:
    """A folder being archived: its descriptor, member name, path (for messages) and names left."""

    fd: int
    name: str
    where: Path
    parts: Iterator[str] | None = None


def _add_store(tar: tarfile.TarFile, store_dir: Path) -> int:
    """Archives the store folder as `store/`, like tarfile's add (folders first, names sorted), but walked
    by descriptors: each folder opened in the one above it (O_DIRECTORY | O_NOFOLLOW), each file opened in
    its folder and checked as opened (`_add_file`). tarfile checks a path (lstat) and then opens it by
    name, which follows a link put there in between. Refuses names restore refuses, links, special files
    and hard links. The number of members added."""
    members = 0
    walk: list[_Folder] = []
    try:
        try:
            walk.append(_Folder(os.open(store_dir, _DIR_FLAGS), STORE, store_dir))
        except OSError as exc:
            raise SnapshotError(f"cannot read {store_dir}: {exc.strerror}") from exc
        while walk:
            folder = walk[-1]
            if folder.parts is None:  # just opened: its own member, then what it holds
                try:
                    st, names = os.fstat(folder.fd), sorted(os.listdir(folder.fd))
                except OSError as exc:
                    raise SnapshotError(f"cannot read {folder.where}: {exc.strerror}") from exc
                tar.addfile(_member(folder.name, st))
                members += 1
                folder.parts = iter(names)
            part = next(folder.parts, None)
            if part is None:
                os.close(walk.pop().fd)
                continue
            name, where = f"{folder.name}/{part}", folder.where / part
            fault = _name_fault(name)
            if fault:
                raise SnapshotError(  # repr: the name may hold control characters or bytes not UTF-8
                    f"{str(where)!r} {fault}, which ctl restore refuses in an archive "
                    "(rename it, or move it out of the store)"
                )
            try:
                mode = os.stat(part, dir_fd=folder.fd, follow_symlinks=False).st_mode
            except OSError as exc:
                raise _changed(where, folder.fd, part) from exc
            if stat.S_ISDIR(mode):
                try:
                    walk.append(_Folder(os.open(part, _DIR_FLAGS, dir_fd=folder.fd), name, where))
                except OSError as exc:  # ELOOP or ENOTDIR: no longer a folder
                    raise _changed(where, folder.fd, part) from exc
            elif stat.S_ISREG(mode):
                _add_file(tar, folder.fd, part, name, where)
                members += 1
            else:
                link = "?"
                if stat.S_ISLNK(mode):
                    with contextlib.suppress(OSError):
                        link = os.readlink(part, dir_fd=folder.fd)
                raise _not_plain(where, mode, link)
    finally:
        for folder in walk:
            os.close(folder.fd)
    return members


def snapshot(store_dir: Path, out: Path) -> dict:
    """Archives the embedded store at `store_dir` into `out` (.tar.gz, written atomically); the manifest.
    Only folders and regular files of one name (no hard links) are archived, without owners, under names
    restore accepts; anything else in the store is refused (following a link, or a second name of a file
    outside the store, would archive what lies outside it); each file is archived from the descriptor it
    was checked on (`_add_store`), so a name swapped for a link meanwhile is refused. Warns when
    restoring the archive needs more than restore's default limits."""
    store_dir = Path(os.path.realpath(store_dir))  # a link given as the store is the operator's choice
    manifest = asyncio.run(_inventory(store_dir, str(store_dir)))
    data = json.dumps(manifest, indent=2).encode()
    try:
        _check_manifest(_parse_json(data))  # restore's own check: a category it would refuse, say
    except _Refused as exc:
        raise SnapshotError(f"{store_dir} would make a manifest ctl restore refuses: {exc}") from None
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tmp, "w:gz") as tar:
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, fileobj=io.BytesIO(data))
            members = 1 + _add_store(tar, store_dir)
            stream = tar.offset + tarfile.BLOCKSIZE  # what restore reads: up to the first end block
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except (OSError, tarfile.TarError) as exc:
        raise SnapshotError(f"cannot write {out}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    defaults = RestoreLimits()
    for name, have, limit in (
        ("max_bytes", stream, defaults.max_bytes),
        ("max_members", members, defaults.max_members),
        ("max_manifest_bytes", len(data), defaults.max_manifest_bytes),
    ):
        if have > limit:
            log.warning(
                "%s: restoring it needs %s of %d or more (default %d)", out, _named(name), have, limit
            )
    return manifest


# ---------------------------------------------------------------- restore: reading the archive


def _pax_records_ok(buf: bytes) -> bool:
    """Whether `buf` (a pax header's data with its block padding) is `LENGTH KEYWORD=VALUE\\n` records
    that tile it exactly, without `hdrcharset`: then tarfile's parser reads each byte a bounded number
    of times, on every Python."""
    end = buf.find(b"\0")
    end = len(buf) if end < 0 else end
    if buf[end:].strip(b"\0") or b"hdrcharset" in buf:
        return False
    pos = 0
    while pos < end:
        space = buf.find(b" ", pos, pos + 12)
        if space <= pos or not buf[pos:space].isdigit():
            return False
        length = int(buf[pos:space])
        record = buf[pos : pos + length]
        if pos + length > end or not record.endswith(b"\n") or b"=" not in record[space - pos + 2 :]:
            return False
        pos += length
    return True


def _too_large(limit: int) -> str:
    return f"it unpacks to more than {_size(limit)} ({_named('max_bytes')}; raise it for a larger store)"


class _Capped:
    """The archive's decompressed tar stream, as tarfile reads it: never past `limit` bytes, and while a
    member header is parsed (`header_left` set) at most that many bytes of well-formed header material."""

    def __init__(self, gz: gzip.GzipFile, limit: int) -> None:
        self._gz, self._limit = gz, limit
        self.header_left: int | None = HEADER_BYTES  # tarfile parses the first header as it opens
        self._pax_next = False

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._gz.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise io.UnsupportedOperation("only absolute seeks")
        if offset > self._limit:
            raise _Refused(_too_large(self._limit))
        return self._gz.seek(offset)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise io.UnsupportedOperation("only bounded reads")
        if self._gz.tell() + size > self._limit:
            raise _Refused(_too_large(self._limit))
        if self.header_left is None:
            return self._gz.read(size)
        if size > self.header_left:
            raise _Refused(f"a member header is larger than {_size(HEADER_BYTES)}: not a ctl snapshot")
        self.header_left -= size
        data = self._gz.read(size)
        if _LONG_NUMBER.search(data):
            raise _Refused("a member header holds a number of more than 32 digits: not a ctl snapshot")
        if self._pax_next:
            self._pax_next = False
            if not _pax_records_ok(data):
                raise _Refused("a malformed pax header: not a ctl snapshot")
        elif len(data) == tarfile.BLOCKSIZE and data[156:157] in (b"x", b"g"):
            self._pax_next = True  # tarfile reads the pax records next, in one read
        return data


def _kind(member: tarfile.TarInfo) -> str:
    """What a member is, in words."""
    if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return "a sparse file" if member.sparse is not None else "a regular file"
    return {
        tarfile.DIRTYPE: "a folder",
        tarfile.SYMTYPE: f"a symbolic link (to {_shown(member.linkname)})",
        tarfile.LNKTYPE: f"a hard link (to {_shown(member.linkname)})",
        tarfile.CHRTYPE: "a character device",
        tarfile.BLKTYPE: "a block device",
        tarfile.FIFOTYPE: "a FIFO",
        tarfile.CONTTYPE: "a contiguous file",
        tarfile.GNUTYPE_SPARSE: "a sparse file",
    }.get(member.type, f"of tar type {_shown(member.type)}")


def _name_fault(name: str) -> str | None:
    """What is wrong with a member name, or None if a ctl snapshot may have it: relative, no empty/`.`/`..`
    parts, no control characters or backslash, not too long, under `store/` or the manifest itself. Both
    sides apply it: restore to refuse an archive, snapshot to refuse a store restore would refuse."""
    if _CONTROL.search(name) or "\\" in name:
        return "has control characters, a backslash or bytes not UTF-8"
    if len(name.encode()) > NAME_BYTES:
        return f"has a name longer than {NAME_BYTES} bytes"
    if name.startswith("/"):
        return "has an absolute name"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' part"
    if any(len(part.encode()) > PART_BYTES for part in parts):
        return f"has a part longer than {PART_BYTES} bytes"
    if name != MANIFEST and parts[0] != STORE:
        return f"is neither {MANIFEST} nor under {STORE}/"
    return None


def _checked_name(member: tarfile.TarInfo) -> str:
    """The member's name, if it is one a ctl snapshot has (`_name_fault`)."""
    name = member.name[:-1] if member.isdir() and member.name.endswith("/") else member.name
    fault = _name_fault(name)
    if fault:
        raise _Refused(f"member {_shown(name)} {fault}")
    return name


def _free_bytes(path: Path) -> int:
    """Free space on the filesystem where `path` is or would be created."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _scan(tar: tarfile.TarFile, src: _Capped, limits: RestoreLimits, free: int) -> list[tarfile.TarInfo]:
    """Every member, checked before anything is written (see the module's step 1); names normalised."""
    members: list[tarfile.TarInfo] = []
    folders: set[str] = set()
    names: set[str] = set()
    total = need = 0
    while True:
        src.header_left = HEADER_BYTES
        member = tar.next()
        src.header_left = None
        if member is None:
            break
        if len(members) == limits.max_members:
            raise _Refused(f"it holds more than {limits.max_members} members ({_named('max_members')})")
        name = _checked_name(member)
        is_file = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and member.sparse is None
        if not (is_file or member.type == tarfile.DIRTYPE):
            raise _Refused(f"member {_shown(name)} is {_kind(member)}: only regular files and folders")
        if name in names:
            raise _Refused(f"member {_shown(name)} appears twice")
        if name == MANIFEST and not is_file:
            raise _Refused(f"{MANIFEST} is {_kind(member)}, not a regular file")
        if name == MANIFEST and member.size > limits.max_manifest_bytes:
            raise _Refused(
                f"{MANIFEST} is larger than {_size(limits.max_manifest_bytes)} "
                f"({_named('max_manifest_bytes')})"
            )
        if name == STORE and is_file:
            raise _Refused(f"{STORE} is {_kind(member)}, not a folder")
        parent = name.rpartition("/")[0]
        if parent and parent not in folders:
            raise _Refused(f"member {_shown(name)} comes without its folder {_shown(parent)} before it")
        names.add(name)
        if not is_file:
            folders.add(name)
        member.name = name
        members.append(member)
        total += member.size
        need += -(-member.size // BLOCK) * BLOCK + BLOCK
        if total > limits.max_bytes:
            raise _Refused(_too_large(limits.max_bytes))
        if need > free:
            raise _Refused(f"it needs {_size(need)} or more, and the disk has {_size(free)} free")
    if MANIFEST not in names:
        raise _Refused(f"no {MANIFEST}: not a ctl snapshot")
    if STORE not in folders:
        raise _Refused(f"no {STORE}/ folder: not a ctl snapshot")
    return members


# ---------------------------------------------------------------- restore: the manifest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Refused("a key appears twice in one object")
    return dict(pairs)


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Refused(f"not JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    for kind, words in ((dict, "an object"), (list, "an array"), (str, "a string"), (int, "an integer")):
        if isinstance(value, kind):
            return words
    return "a number" if isinstance(value, float) else type(value).__name__


def _integer(record: dict, key: str, low: int, high: int) -> int:
    value = record.get(key)
    if type(value) is not int or not low <= value <= high:
        shown = _shown(value) if key in record else "missing"
        raise _Refused(f"{key} is {shown}, expected an integer from {low} to {high}")
    return value


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit or _CONTROL.search(value):
        raise _Refused(f"{what} is {_shown(value)}, expected text of 1 to {limit} printable characters")
    return value


def _category(name: str) -> str:
    """A category as the ranker accepts one: non-empty text of at most CATEGORY_BYTES (control characters
    included: it is only compared with the store's, and shown with repr)."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        size = 0
    if not 0 < size <= CATEGORY_BYTES:
        raise _Refused(f"category {_shown(name)} is not 1 to {CATEGORY_BYTES} bytes of UTF-8")
    return name


def _version(record: dict) -> str:
    value = record.get("model_version")
    if not isinstance(value, str) or not MODEL_VERSION.fullmatch(value):
        raise _Refused(
            f"model_version is {_shown(value) if 'model_version' in record else 'missing'}, expected "
            "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def _check_manifest(value: Any) -> dict:
    """The manifest's fields, each of the expected type and range; products add up."""
    if not isinstance(value, dict):
        raise _Refused(f"holds {_json_kind(value)}, expected an object")
    if value.get("format") != FORMAT or type(value.get("format")) is not int:
        raise _Refused(f"format is {_shown(value.get('format'))}, expected {FORMAT}")
    manifest = {
        "format": FORMAT,
        "model_version": _version(value),
        "dim": _integer(value, "dim", 1, 65536),
        "products": _integer(value, "products", 0, 2**53),
    }
    by_category = value.get("products_by_category")
    if not isinstance(by_category, dict):
        raise _Refused(f"products_by_category is {_json_kind(by_category)}, expected an object")
    counts = {_category(name): _integer(by_category, name, 0, 2**53) for name in by_category}
    if sum(counts.values()) != manifest["products"]:
        raise _Refused(
            f"products is {manifest['products']}, but products_by_category adds up to {sum(counts.values())}"
        )
    manifest["products_by_category"] = counts
    if "created" in value:
        manifest["created"] = _text(value["created"], "created", 64)
    return manifest


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> dict:
    source = tar.extractfile(member)
    assert source is not None  # a regular file, checked by _scan
    with source:
        data = source.read(limit + 1)
    if len(data) != member.size:
        raise _Refused(f"{MANIFEST} is shorter than its header says: the archive is damaged")
    try:
        return _check_manifest(_parse_json(data))
    except _Refused as exc:
        raise _Refused(f"{MANIFEST}: {exc}") from None


# ---------------------------------------------------------------- restore: the target


def _template_base(target: str) -> Path:
    """The fixed part of the target template, which a restore must stay under: up to the first part
    holding {model_version} (`ctl-store` for `ctl-store/{model_version}`); the parent without one."""
    parts = Path(target).parts
    for i, part in enumerate(parts):
        if PLACEHOLDER in part:
            return Path(*parts[:i]) if i else Path(".")
    return Path(target).parent


def _target_folder(target: str, version: str) -> Path:
    """The folder to create for `version`; refused if it exists or lies outside the template's base."""
    base = _template_base(target)
    folder = Path(target.replace(PLACEHOLDER, version))
    if os.path.lexists(folder):
        raise _Refused(f"{folder} already exists: restore into a new folder (or move this one away first)")
    real, real_base = Path(os.path.realpath(folder)), Path(os.path.realpath(base))
    if real == real_base or not real.is_relative_to(real_base):
        raise _Refused(f"model version {version!r} would restore to {folder}, outside {base}")
    return folder


def _make_parents(folder: Path) -> list[Path]:
    """Creates the folders above `folder` that are missing; the ones it created, outermost first."""
    missing = []
    path = folder
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    created = []
    try:
        for path in reversed(missing):
            os.mkdir(path)
            created.append(path)
    except OSError:
        _remove_folders(created)
        raise
    return created


def _remove_folders(folders: list[Path]) -> None:
    """Removes the (empty) folders a failed restore created, innermost first."""
    for path in reversed(folders):
        try:
            os.rmdir(path)
        except OSError:
            pass  # not empty: someone else put something there meanwhile


# ---------------------------------------------------------------- restore: writing


def _open_folder(root: int, parts: list[str]) -> int:
    """A descriptor of the folder `parts` below `root`, opened part by part, never through a link."""
    fd = root
    for part in parts:
        child = os.open(part, _DIR_FLAGS, dir_fd=fd)
        if fd != root:
            os.close(fd)
        fd = child
    return fd


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, out: io.BufferedWriter, left: int) -> int:
    """Copies the member's bytes, counted: never more than its header says nor than `left` in all.
    Runs of zeros become holes (qdrant-edge preallocates its files: a store's are mostly zeros)."""
    source = tar.extractfile(member)
    assert source is not None
    count = 0
    with source:
        while chunk := source.read(CHUNK):
            count += len(chunk)
            if count > member.size or count > left:
                raise _Refused(f"member {_shown(member.name)} holds more bytes than its header says")
            if chunk.count(0) == len(chunk):
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
    out.truncate(count)
    if count != member.size:
        raise _Refused(f"member {_shown(member.name)} is shorter than its header says: a damaged archive")
    return count


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], staging: Path, limit: int) -> None:
    """Writes the checked members into the fresh `staging` folder: folders made, files created anew
    (O_EXCL | O_NOFOLLOW), every path opened part by part without following links; in all at most
    `limit` bytes, counted as they are written."""
    root = os.open(staging, _DIR_FLAGS)
    left = limit
    try:
        for member in members:
            *parents, leaf = member.name.split("/")
            folder = _open_folder(root, parents)
            try:
                if member.isdir():
                    os.mkdir(leaf, 0o777, dir_fd=folder)
                    continue
                with open(os.open(leaf, _NEW_FILE, 0o666, dir_fd=folder), "wb") as out:
                    left -= _write_file(tar, member, out, left)
            finally:
                if folder != root:
                    os.close(folder)
    finally:
        os.close(root)


def _restore_checked(archive: Path, tar: tarfile.TarFile, src: _Capped, target: str, limits: RestoreLimits):
    members = _scan(tar, src, limits, _free_bytes(_template_base(target)))
    manifest = _read_manifest(tar, next(m for m in members if m.name == MANIFEST), limits.max_manifest_bytes)
    folder = _target_folder(target, manifest["model_version"])
    created = _make_parents(folder.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.restore-", dir=folder.parent))
    try:
        _extract(tar, members, staging, limits.max_bytes)
        restored = staging / STORE
        if not stat.S_ISDIR(os.lstat(restored).st_mode):
            raise _Refused(f"{STORE} is not a folder")
        found = asyncio.run(_inventory(restored, f"the store in {archive}"))
        for key in ("model_version", "dim", "products", "products_by_category"):
            if found[key] != manifest[key]:
                raise _Refused(
                    f"the restored store holds {key} {_shown(found[key])}, the manifest says "
                    f"{_shown(manifest[key])}; the archive is damaged"
                )
        if os.path.lexists(folder):
            raise _Refused(f"{folder} appeared while restoring; nothing was changed there")
        try:
            os.rename(restored, folder)
        except OSError as exc:
            raise _Refused(f"cannot move the restored store to {folder}: {exc.strerror}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_folders(created)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return folder, manifest


def restore(archive: Path, target: str, limits: RestoreLimits | None = None) -> tuple[Path, dict]:
    """Unpacks `archive` into `target` ({model_version} is replaced from the manifest), which must not
    exist; checks that the restored store opens and holds what the manifest says. (folder, manifest).
    SnapshotError, one line naming the archive, for anything refused; nothing is left behind then."""
    limits = limits or RestoreLimits()
    try:
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            src = _Capped(gz, limits.max_bytes)
            with tarfile.open(fileobj=src, mode="r:") as tar:
                return _restore_checked(archive, tar, src, target, limits)
    except (_Refused, SnapshotError) as exc:  # SnapshotError: the store check, naming what it opened
        raise _restore_error(archive, str(exc)) from exc
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _restore_error(archive, f"not a readable .tar.gz ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise _restore_error(archive, f"{exc.strerror or exc}{where}") from exc


def _restore_error(archive: Path, reason: str) -> SnapshotError:
    return SnapshotError(f"cannot restore {archive}: {reason}".replace("\n", " "))
