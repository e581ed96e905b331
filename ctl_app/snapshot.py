"""`ctl snapshot` / `ctl restore`: the embedded catalog as one archive, and back.

What the embedded store's files are, how to read them consistently and how to check that a store opens is
the store package's (ranker_service/store/snapshot.py, record.py); this module is the job around it: the
archive, its names and limits, the messages. A snapshot is taken of a store no ranker holds (stop the
ranker, or snapshot a replica's copy): the store is inspected (opened, which proves nobody else has it and
replays its log, flushed and closed), then archived as a .tar.gz with a manifest (model version,
dimension, products per category). A store that holds a link, a file of more than one name (a hard link)
or a special file is refused rather than archived (each could carry a file from outside the store into
the archive), and so is one holding a name restore refuses (the same rules, `_name_fault`).

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
   with a model version of letters, digits, `.`, `_` and `-` (the store record's rules,
   ranker_service/store/record.py), which decides the folder:
   it must not exist and must lie under the template's fixed part (`ctl-store/` of the default);
3. the members are written into a fresh staging folder beside the target, each file created anew
   (O_EXCL, never through a link), the bytes counted as they are written;
4. the restored store is opened (`inspect_store`) and must hold what the manifest says (a damaged one that
   makes the engine panic is refused like any other); only then is it moved into place.
Any failure removes the staging folder and the parent folders the restore created, and the message names
the archive and the target, never the staging folder.

A Qdrant server has its own snapshots (POST /collections/NAME/snapshots; deploy/qdrant/values.yaml keeps
a snapshot volume), which these commands do not replace.
"""

from __future__ import annotations

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
import tarfile
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

from ctl import settings
from ctl_app.snapshot_settings import (
    ENV_PREFIX,
    MANIFEST,
    KiB,
    RestoreLimits,
    SnapshotError,
)
from ranker_service.store.record import (
    MAX_EMBEDDING_DIM,
    RecordError,
    StoreFileError,
    integer,
    json_kind,
    model_version,
    parse_json,
    shown,
    size_text,
)
from ranker_service.store.snapshot import StoreContents, inspect_store, store_files

log = logging.getLogger(__name__)

STORE = "store"
FORMAT = 1
PLACEHOLDER = "{model_version}"

HEADER_BYTES = 8 * KiB  # tar header material per member (ustar block, pax records, GNU long name)
NAME_BYTES = 1024  # a member's name, UTF-8
PART_BYTES = 255  # one part of it (NAME_MAX)
CATEGORY_BYTES = 1024  # a category in the manifest (the ranker takes 512)
CHUNK = 256 * KiB  # bytes copied per read
BLOCK = 4096  # what a file or folder takes on disk at least, for the free-space estimate

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # and lone surrogates: bytes not UTF-8
_LONG_NUMBER = re.compile(rb"[0-9]{33}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Refused(Exception):
    """The archive is not restored; `restore` prefixes the archive's name to the reason."""


def _named(name: str) -> str:
    return settings.named(ENV_PREFIX, name)


# ---------------------------------------------------------------- snapshot


def _store_error(exc: StoreFileError) -> SnapshotError:
    return SnapshotError(str(exc))


def _manifest(found: StoreContents) -> dict:
    """The manifest of a store as `inspect_store` found it."""
    return {
        "format": FORMAT,
        "model_version": found.model_version,
        "dim": found.embedding_dim,
        "products": sum(found.counts.values()),
        "products_by_category": dict(sorted(found.counts.items())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _member(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """A member from a descriptor's fstat: a folder or a regular file, its mode, size and mtime; no owner."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if stat.S_ISDIR(st.st_mode) else tarfile.REGTYPE
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.size = st.st_size if info.type == tarfile.REGTYPE else 0
    return info


def _refuse_name(name: str, where: Path) -> None:
    """Refuses a file of the store that restore would refuse as a member (`_name_fault`)."""
    fault = _name_fault(name)
    if fault:
        raise SnapshotError(  # repr: the name may hold control characters or bytes not UTF-8
            f"{str(where)!r} {fault}, which ctl restore refuses in an archive "
            "(rename it, or move it out of the store)"
        )


def _add_store(tar: tarfile.TarFile, store_dir: Path) -> int:
    """Archives the store folder as `store/`, like tarfile's add (folders first, names sorted), each file
    from the descriptor it was checked on (`store_files`: tarfile checks a path, lstat, and then opens it
    by name, which follows a link put there in between). Refuses names restore refuses, links, special
    files and hard links. The number of members added."""
    members = 0
    with contextlib.closing(store_files(store_dir, STORE, _refuse_name)) as files:
        for item in files:
            tar.addfile(_member(item.name, item.stat), item.content)
            members += 1
    return members


def snapshot(store_dir: Path, out: Path) -> dict:
    """Archives the embedded store at `store_dir` into `out` (.tar.gz, written atomically); the manifest.
    Only folders and regular files of one name (no hard links) are archived, without owners, under names
    restore accepts; anything else in the store is refused (following a link, or a second name of a file
    outside the store, would archive what lies outside it); each file is archived from the descriptor it
    was checked on (`_add_store`), so a name swapped for a link meanwhile is refused. Warns when
    restoring the archive needs more than restore's default limits."""
    store_dir = Path(os.path.realpath(store_dir))  # a link given as the store is the operator's choice
    try:
        manifest = _manifest(asyncio.run(inspect_store(store_dir, str(store_dir))))
    except StoreFileError as exc:
        raise _store_error(exc) from exc
    data = json.dumps(manifest, indent=2).encode()
    try:
        _check_manifest(parse_json(data))  # restore's own check: a category it would refuse, say
    except (_Refused, RecordError) as exc:
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
    except StoreFileError as exc:  # a file of the store is refused, or changed while archived
        raise _store_error(exc) from exc
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
    return f"it unpacks to more than {size_text(limit)} ({_named('max_bytes')}; raise it for a larger store)"


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
            raise _Refused(f"a member header is larger than {size_text(HEADER_BYTES)}: not a ctl snapshot")
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
        tarfile.SYMTYPE: f"a symbolic link (to {shown(member.linkname)})",
        tarfile.LNKTYPE: f"a hard link (to {shown(member.linkname)})",
        tarfile.CHRTYPE: "a character device",
        tarfile.BLKTYPE: "a block device",
        tarfile.FIFOTYPE: "a FIFO",
        tarfile.CONTTYPE: "a contiguous file",
        tarfile.GNUTYPE_SPARSE: "a sparse file",
    }.get(member.type, f"of tar type {shown(member.type)}")


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
        raise _Refused(f"member {shown(name)} {fault}")
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
            raise _Refused(f"member {shown(name)} is {_kind(member)}: only regular files and folders")
        if name in names:
            raise _Refused(f"member {shown(name)} appears twice")
        if name == MANIFEST and not is_file:
            raise _Refused(f"{MANIFEST} is {_kind(member)}, not a regular file")
        if name == MANIFEST and member.size > limits.max_manifest_bytes:
            raise _Refused(
                f"{MANIFEST} is larger than {size_text(limits.max_manifest_bytes)} "
                f"({_named('max_manifest_bytes')})"
            )
        if name == STORE and is_file:
            raise _Refused(f"{STORE} is {_kind(member)}, not a folder")
        parent = name.rpartition("/")[0]
        if parent and parent not in folders:
            raise _Refused(f"member {shown(name)} comes without its folder {shown(parent)} before it")
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
            raise _Refused(f"it needs {size_text(need)} or more, and the disk has {size_text(free)} free")
    if MANIFEST not in names:
        raise _Refused(f"no {MANIFEST}: not a ctl snapshot")
    if STORE not in folders:
        raise _Refused(f"no {STORE}/ folder: not a ctl snapshot")
    return members


# ---------------------------------------------------------------- restore: the manifest


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit or _CONTROL.search(value):
        raise _Refused(f"{what} is {shown(value)}, expected text of 1 to {limit} printable characters")
    return value


def _category(name: str) -> str:
    """A category as the ranker accepts one: non-empty text of at most CATEGORY_BYTES (control characters
    included: it is only compared with the store's, and shown with repr)."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        size = 0
    if not 0 < size <= CATEGORY_BYTES:
        raise _Refused(f"category {shown(name)} is not 1 to {CATEGORY_BYTES} bytes of UTF-8")
    return name


def _check_manifest(value: Any) -> dict:
    """The manifest's fields, each of the expected type and range; products add up. The rules are the
    store record's (ranker_service/store/record.py): RecordError, or _Refused, says what is wrong."""
    if not isinstance(value, dict):
        raise _Refused(f"holds {json_kind(value)}, expected an object")
    if value.get("format") != FORMAT or type(value.get("format")) is not int:
        raise _Refused(f"format is {shown(value.get('format'))}, expected {FORMAT}")
    manifest = {
        "format": FORMAT,
        "model_version": model_version(value),
        "dim": integer(value, "dim", 1, MAX_EMBEDDING_DIM),
        "products": integer(value, "products", 0, 2**53),
    }
    by_category = value.get("products_by_category")
    if not isinstance(by_category, dict):
        raise _Refused(f"products_by_category is {json_kind(by_category)}, expected an object")
    counts = {_category(name): integer(by_category, name, 0, 2**53) for name in by_category}
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
        return _check_manifest(parse_json(data))
    except (_Refused, RecordError) as exc:
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
                raise _Refused(f"member {shown(member.name)} holds more bytes than its header says")
            if chunk.count(0) == len(chunk):
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
    out.truncate(count)
    if count != member.size:
        raise _Refused(f"member {shown(member.name)} is shorter than its header says: a damaged archive")
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
        found = _manifest(asyncio.run(inspect_store(restored, f"the store in {archive}")))
        for key in ("model_version", "dim", "products", "products_by_category"):
            if found[key] != manifest[key]:
                raise _Refused(
                    f"the restored store holds {key} {shown(found[key])}, the manifest says "
                    f"{shown(manifest[key])}; the archive is damaged"
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
    except (_Refused, StoreFileError) as exc:  # StoreFileError: the store check, naming what it opened
        raise _restore_error(archive, str(exc)) from exc
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _restore_error(archive, f"not a readable .tar.gz ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise _restore_error(archive, f"{exc.strerror or exc}{where}") from exc


def _restore_error(archive: Path, reason: str) -> SnapshotError:
    return SnapshotError(f"cannot restore {archive}: {reason}".replace("\n", " "))
