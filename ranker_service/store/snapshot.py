"""The embedded store's files as a snapshot takes them and a restore checks them (`ctl snapshot`/`restore`).

qdrant-edge cannot snapshot a live shard from Python, and its write-ahead log locks the directory while a
ranker has it open; so a snapshot is taken of a store no ranker holds. Two calls:
- `inspect_store` opens the store (which proves nobody else holds it and replays its log), reads its
  record and its products per category, flushes and closes it; a damaged store that makes the engine
  panic is refused like any other, its panic report held back (`_engine_report`);
- `store_files` walks the store's folders and files by descriptors, never through a link, and hands each
  file over as the descriptor it was checked on (a regular file of one name), read exactly at its size:
  a link, a hard link, a special file, or a file that changes meanwhile is refused (StoreFileError).
How the files are packed (the archive, its names and limits) is the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ranker_service.store.record import StoreFileError, read_record, shown

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class StoreContents:
    """What a store holds, as `inspect_store` found it: its record and its products per category."""

    model_version: str
    embedding_dim: int
    counts: dict[str, int]


# ---------------------------------------------------------------- opening a store to check it

# What `inspect_store` lets through: the caller's interruptions. Anything else the engine raises is about
# the store, a panic included (pyo3_runtime.PanicException, a BaseException: a damaged shard makes
# qdrant-edge index past a file's end).
_NOT_ENGINE_FAULTS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


async def inspect_store(store_dir: Path, shown_as: str) -> StoreContents:
    """Opens the store (proving no ranker holds it), reads what it holds, flushes and closes it.
    StoreFileError names the store as `shown_as` (a restore's staging folder is gone by the time anyone
    reads the message)."""
    record = read_record(store_dir, shown_as)
    try:
        with _engine_report():
            from ranker_service.store.edge import open_edge_store  # the engine, only when a store is opened

            store = await open_edge_store(store_dir, record.model_version, record.embedding_dim)
            try:
                counts = await store.counts_by_category()
            finally:
                await store.close()
    except _NOT_ENGINE_FAULTS:
        raise
    except BaseException as exc:  # the engine's own errors, and its panic on a damaged shard
        reason = (str(exc) or type(exc).__name__).replace(str(store_dir), shown_as).replace("\n", " ")
        if not isinstance(exc, Exception):
            reason = f"qdrant-edge panicked ({reason[:200]}): the store is damaged"
        raise StoreFileError(f"cannot open {shown_as}: {reason}") from exc
    return StoreContents(record.model_version, record.embedding_dim, counts)


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
    StoreFileError says it in one line; anything else is passed on afterwards, in order, as far as stderr
    takes it (closed, full or a pipe nobody reads: dropped, never a failure). fd 2 points at the held file
    even when it was closed, so that no file the engine opens takes its number (a report would be written
    into it); it is closed again afterwards. A process started without fd 2 (no sys.__stderr__) whose
    number another file has taken since (asyncio's epoll, say) is left alone: that file is not stderr.
    Other threads' output in the meantime is held too (ctl snapshot and restore run none)."""
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


# ---------------------------------------------------------------- copying a store's files


@dataclass(frozen=True)
class StoreFile:
    """A folder or regular file of the store: its name (`root/part/...`), its status as opened (fstat),
    and for a file its bytes (read exactly `stat.st_size` of them; None for a folder)."""

    name: str
    stat: os.stat_result
    content: ExactReader | None = None


def file_kind(mode: int, link: str = "?") -> str:
    """What a file in the store is, in words."""
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {shown(link)})"
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


def _not_plain(where: Path, mode: int, link: str = "?") -> StoreFileError:
    return StoreFileError(
        f"{where} is {file_kind(mode, link)}: a snapshot holds only regular files and folders "
        "(move it out of the store, or copy what it points to into it)"
    )


def _changed(where: Path, parent: int, part: str) -> StoreFileError:
    """A name that is no longer what it was when checked (someone writes to the store meanwhile)."""
    try:
        now = file_kind(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        now = "gone"
    return StoreFileError(
        f"{where} changed while it was archived (now {now}): stop whatever writes to the store, "
        "then take the snapshot again"
    )


class ExactReader:
    """A regular file's bytes as an archive reads them: exactly `size`; a file that ends before (it shrank
    while read) is refused rather than archived short."""

    def __init__(self, fd: int, size: int, where: Path) -> None:
        self._fd, self._left, self._where = fd, size, where

    def read(self, size: int) -> bytes:
        size = min(size, self._left)
        parts = []
        while size:
            try:
                chunk = os.read(self._fd, size)
            except OSError as exc:
                raise StoreFileError(f"cannot read {self._where}: {exc.strerror}") from exc
            if not chunk:
                raise StoreFileError(
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
            raise StoreFileError(f"cannot read {self._where}: {exc.strerror}") from exc


def _file(parent: int, part: str, name: str, where: Path) -> Iterator[StoreFile]:
    """The regular file `part` of the folder open as `parent`: opened without following a link
    (O_NOFOLLOW) and without blocking on a FIFO, then checked as opened (fstat: a regular file of one
    name) and handed over as that descriptor, so that what is copied is what was checked; once the
    caller has read it, refused if it grew meanwhile."""
    try:
        fd = os.open(part, _FILE_FLAGS, dir_fd=parent)
    except OSError as exc:  # ELOOP: a link now; ENXIO: a socket; ENOENT: gone
        raise _changed(where, parent, part) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _changed(where, parent, part)
        if st.st_nlink > 1:
            raise StoreFileError(
                f"{where} is a hard link (one of {st.st_nlink} names of a file, which may lie outside the "
                "store): a snapshot holds only files of one name (replace it with a copy)"
            )
        content = ExactReader(fd, st.st_size, where)
        yield StoreFile(name, st, content)
        if content.grew():
            raise StoreFileError(
                f"{where} grew while it was archived: stop whatever writes to the store, "
                "then take the snapshot again"
            )
    finally:
        os.close(fd)


@dataclass
class _Folder:
    """A folder being walked: its descriptor, name, path (for messages) and names left."""

    fd: int
    name: str
    where: Path
    parts: Iterator[str] | None = None


def store_files(store_dir: Path, root: str, check_name: Callable[[str, Path], None]) -> Iterator[StoreFile]:
    """The store's folders and regular files, named `root`, `root/...` (folders first, names sorted, as
    tarfile's add walks), walked by descriptors: each folder opened in the one above it (O_DIRECTORY |
    O_NOFOLLOW), each file opened in its folder and checked as opened (`_file`); a file's content is read
    before the next item is asked for. `check_name(name, path)` may refuse a name (by raising) before it
    is looked at. Links, special files and hard links are refused (StoreFileError): following one, or
    a second name of a file outside the store, would copy what lies outside it. Close the iterator (or
    run it to the end) to release its descriptors."""
    walk: list[_Folder] = []
    try:
        try:
            walk.append(_Folder(os.open(store_dir, _DIR_FLAGS), root, store_dir))
        except OSError as exc:
            raise StoreFileError(f"cannot read {store_dir}: {exc.strerror}") from exc
        while walk:
            folder = walk[-1]
            if folder.parts is None:  # just opened: itself, then what it holds
                try:
                    st, names = os.fstat(folder.fd), sorted(os.listdir(folder.fd))
                except OSError as exc:
                    raise StoreFileError(f"cannot read {folder.where}: {exc.strerror}") from exc
                yield StoreFile(folder.name, st)
                folder.parts = iter(names)
            part = next(folder.parts, None)
            if part is None:
                os.close(walk.pop().fd)
                continue
            name, where = f"{folder.name}/{part}", folder.where / part
            check_name(name, where)
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
                yield from _file(folder.fd, part, name, where)
            else:
                link = "?"
                if stat.S_ISLNK(mode):
                    with contextlib.suppress(OSError):
                        link = os.readlink(part, dir_fd=folder.fd)
                raise _not_plain(where, mode, link)
    finally:
        for folder in walk:
            os.close(folder.fd)
