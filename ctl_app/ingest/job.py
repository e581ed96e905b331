"""`ctl ingest`: stream a product catalog to the ranker's UpsertProducts, resumably.

The catalog is read twice, in order: once for its ids (the progress total, and the check below), then for
sending. Each record is decided before anything is sent: unreadable ones, missing image files and
duplicate ids with different data fail here; records the journal already holds with the same content are
skipped; the rest go out in batches, one UpsertProducts stream per batch, `streams` batches in flight. A
batch carries at most `batch_bytes` of images, and the job holds at most `max_bytes_in_flight` of images
(besides the one it is reading): the reader waits for streams to end. Outcomes are journaled only once
the ranker has answered for the whole stream, so a killed job loses at most the batches in flight (sent
again on the next run: upserts are idempotent). A stream that fails on UNAVAILABLE and the like is
retried with backoff; if it still fails the job stops sending, and every record not ingested is listed in
the error report with the reason.

The journal is checked against the store, product by product, at the start and at the end. The store
can have lost what the journal says landed (wiped, restored from an older copy, products deleted through
DeleteProducts) while the target's name and model version stay the same. At the start, the ranker is
asked (GetProducts, up to 10,000 ids and about 1 MiB of reply per call) for every product of the
catalog that the journal records as ingested: one the store lacks, or holds with another category or
metadata than the journal recorded (an older copy of it; images cannot be compared, the store keeps
vectors), is not trusted: its record is sent again (upserts are idempotent), with a warning that says
how many and why. Products the store holds besides (other sources, products since taken out of the
catalog) do not matter. At the end the same check runs over what the job ingested or trusted (the
store may have changed during the job): if the store lacks any of them, or holds one otherwise, the job
says so and exits non-zero, and a rerun sends them. Each check costs one GetProducts call per 10,000
journaled products (its time at scale: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from ctl import settings
from ctl.progress import progress_bar
from ctl.retry import backoff
from ctl.settings import GRPC_MAX_MESSAGE_BYTES, in_range, more_than, setting
from ctl.terminal import printable
from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from ctl_app.ingest.catalog import (
    FORMATS,
    MAX_IMAGE_BYTES,
    CatalogRecord,
    ImageFileError,
    read_catalog,
    read_image,
)
from ctl_app.ingest.journal import Journal, Outcome

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_BACKOFF_S, RETRY_BACKOFF_CAP_S = 0.5, 10.0  # the pauses between attempts of a transient failure

# Record failures that depend only on the record (a corrupt image...): journaled, not retried by a rerun.
# Any other status of a record (RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL...) is reported, and sent again
# by the next run.
PERMANENT = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "ALREADY_EXISTS", "OUT_OF_RANGE"}
OLD_RANKER = (
    "the ranker has no GetProducts (older than this ctl): the journal is trusted without checking the "
    "store (a wiped or restored store is not noticed); upgrade the ranker to check it"
)
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
# grpc's asyncio client fails a stream's write on a call the transport already ended (the ranker killed
# mid-stream) with INTERNAL "Internal error from Core" (grpc/grpc#36066) instead of UNAVAILABLE: the
# ranker never answered, so it is retried like UNAVAILABLE. An INTERNAL the ranker sent is not.
CORE_WRITE_FAILED = "Internal error from Core"


def _transient(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the call may succeed if made again (upserts are idempotent)."""
    if exc.code() == grpc.StatusCode.INTERNAL:
        return (exc.details() or "").startswith(CORE_WRITE_FAILED)
    return exc.code() in RETRYABLE


# The journal's checks against the store: GetProducts calls of at most CHECK_IDS ids and about CHECK_BYTES
# of reply (gRPC's default receive limit is 4 MiB; a listing's metadata can be long).
CHECK_IDS = 10_000
CHECK_BYTES = 1 << 20
CHECK_OVERHEAD = 16  # reply bytes per product besides its listing's JSON
CHECK_TIMEOUT_S = 60.0

MiB = 1 << 20
BATCH_BYTES = 32 * MiB  # image bytes per UpsertProducts stream at most (one larger image goes alone)
MAX_BYTES_IN_FLIGHT = 256 * MiB  # image bytes the job holds at once: read ahead, queued, in flight


class ConfigError(ValueError):
    """A setting of an ingestion job that makes no sense (`ctl ingest` exits 2 naming it)."""


@dataclass(frozen=True)
class IngestConfig:
    """One ingestion job. Its settings are `ctl ingest`'s flags and CTL_INGEST_* variables (ctl.settings,
    ctl_app/ingest/cli.py); every value is checked here too, naming the field."""

    catalog: Path  # not a setting: `ctl ingest`'s positional argument
    images: Path | None = field(
        default=None,
        metadata=setting(
            "folder the image paths are relative to, and that they must lie in once links are followed "
            "(default: the catalog's)"
        ),
    )
    format: str | None = field(
        default=None, metadata=setting("catalog format (default: from the suffix)", choices=FORMATS)
    )
    metadata_columns: tuple[str, ...] = field(
        default=(), metadata=setting("comma-separated extra columns kept as metadata")
    )
    batch: int = field(default=64, metadata=setting("records per stream", check=in_range(1, 100_000)))
    batch_bytes: int = field(
        default=BATCH_BYTES,
        metadata=setting("image bytes per stream (a larger image goes alone)", check=in_range(1, 1 << 40)),
    )
    streams: int = field(default=4, metadata=setting("streams in flight", check=in_range(1, 256)))
    max_bytes_in_flight: int = field(
        default=MAX_BYTES_IN_FLIGHT,
        metadata=setting(
            "image bytes the job holds at once, read ahead, queued and in flight, besides the one image "
            "being read: the reader waits for streams to end (a larger image goes alone)",
            check=in_range(1, 1 << 40),
        ),
    )
    journal: Path | None = field(default=None, metadata=setting("journal file (default: CATALOG.journal)"))
    errors: Path | None = field(
        default=None, metadata=setting("error report (default: CATALOG.errors.jsonl)")
    )
    fresh: bool = field(
        default=False, metadata=setting("ignore the journal: send every record again", switch=True)
    )
    retries: int = field(
        default=5,
        metadata=setting(
            "retries of a failed stream (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED)",
            check=in_range(0, 100),
        ),
    )
    stream_timeout_s: float = field(
        default=600.0,
        metadata=setting("deadline of each UpsertProducts stream, in seconds", check=more_than(0)),
    )
    allow_images_outside: bool = field(
        default=False,
        metadata=setting(
            "read image files outside --images too (absolute paths, ../, links): only for a catalog you "
            "trust as much as this job's file access",
            switch=True,
        ),
    )
    max_image_bytes: int = field(
        default=MAX_IMAGE_BYTES,
        metadata=setting(
            "largest image file sent, in bytes; larger ones fail unread (the encoder's --max-image-bytes)",
            check=in_range(1, GRPC_MAX_MESSAGE_BYTES),
        ),
    )

    def __post_init__(self) -> None:
        settings.check_fields(self, ConfigError)

    @property
    def journal_path(self) -> Path:
        return self.journal or self.catalog.with_name(self.catalog.name + ".journal")

    @property
    def errors_path(self) -> Path:
        return self.errors or self.catalog.with_name(self.catalog.name + ".errors.jsonl")

    @property
    def images_dir(self) -> Path:
        return self.images or self.catalog.parent


@dataclass(frozen=True)
class Failure:
    line: int
    product_id: str
    code: str
    reason: str


@dataclass
class Summary:
    """What the job did; `failures` is the error report (every record not ingested, with its reason)."""

    records: int = 0
    ingested: int = 0  # sent and stored by this run
    already: int = 0  # skipped: the journal holds the same content, and the store holds it
    resent: int = 0  # of `ingested`: journaled with the same content, sent again (the store did not hold it)
    duplicates: int = 0  # skipped: an identical earlier record of the catalog
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # why the job stopped sending, if it did
    model_version: str = ""
    # At the start, of the catalog's products the journal recorded as ingested: the ids the store lacked,
    # and those it held with another category or metadata (all sent again).
    lacking: list[str] = field(default_factory=list)
    unchecked: bool = False  # the ranker has no GetProducts: the journal was trusted as it is
    other: list[str] = field(default_factory=list)
    # After the job, of the products it ingested or trusted: the ids the store lacks or holds otherwise.
    short: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.stopped and not self.short


@dataclass(frozen=True)
class _Item:
    record: CatalogRecord
    digest: str
    image: bytes
    resent: bool = False  # the journal holds it, but the store did not


def _listing_json(product_id: str, category: str, metadata: Mapping[str, str]) -> bytes:
    return json.dumps([product_id, category, sorted(metadata.items())]).encode()


def _listing(product_id: str, category: str, metadata: Mapping[str, str]) -> str:
    """The digest of what the store returns for a product (GetProducts): id, category, metadata."""
    return hashlib.sha256(_listing_json(product_id, category, metadata)).hexdigest()[:32]


def _digest(record: CatalogRecord, image: bytes) -> str:
    """The digest of a record's whole content: its listing and its image bytes."""
    h = hashlib.sha256(_listing_json(record.product_id, record.category, record.metadata))
    h.update(b"\0")
    h.update(image)
    return h.hexdigest()[:32]


class _ImageBytes:
    """The image bytes the job holds (in the batch being made, queued, in flight), at most `limit`: a batch
    of 64 records was the only bound, and the reader ran up to 9 batches ahead (64 images of 6 MiB each:
    2 GiB). An image larger than the whole limit is taken once nothing else is held. Taken in the reader's
    thread, given back in the event loop's once a stream has ended; `close` ends the reader's wait."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._closed = False
        self._changed = threading.Condition()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    def try_take(self, size: int) -> bool:
        with self._changed:
            if self._closed or not self._fits(size):
                return False
            self.held += size
            return True

    def take(self, size: int) -> bool:
        """Waits until `size` bytes fit; False if the job ended first."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or self._fits(size))
            if self._closed:
                return False
            self.held += size
            return True

    def give(self, size: int) -> None:
        with self._changed:
            self.held -= size
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class _Planner:
    """Walks the catalog and decides each record: fail, skip, or send (with its image bytes)."""

    def __init__(
        self,
        config: IngestConfig,
        journal: Journal,
        summary: Summary,
        bar,
        landed: set[str],
        budget: _ImageBytes,
    ):
        self.config = config
        self.budget = budget
        self.carried: _Item | None = None  # read, but left for the next batch (not in the budget yet)
        self.journal = journal
        self.summary = summary
        self.bar = bar
        self.untrusted = {*summary.lacking, *summary.other}  # journaled, but not held as journaled: resent
        self.landed = landed  # ids the store should hold at the end: those trusted here (and those sent)
        self.records: Iterator[CatalogRecord] = read_catalog(
            config.catalog, config.format, config.metadata_columns
        )
        self.seen: dict[str, tuple[str, int]] = {}  # product id -> (digest, line)

    def next_batch(self) -> list[_Item]:
        """Up to `batch` records to send, with at most `batch_bytes` of images (one larger image goes alone),
        their bytes taken from the budget: with none held here it waits for the streams to give some back,
        else the batch goes as it is ([] at the end of the catalog, or once the job has ended)."""
        batch: list[_Item] = []
        size = 0
        while (item := self.carried or self._next_item()) is not None:
            self.carried = None
            n = len(item.image)
            if not batch:
                if not self.budget.take(n):
                    return []
            elif size + n > self.config.batch_bytes or not self.budget.try_take(n):
                self.carried = item
                break
            batch.append(item)
            size += n
            if len(batch) >= self.config.batch:
                break
        return batch

    def _next_item(self) -> _Item | None:
        """The next record to send (None at the end of the catalog); the others are decided on the way."""
        for record in self.records:
            self.summary.records += 1
            item = self._decide(record)
            if item is not None:
                return item
            self.bar.update(1)
        return None

    def _fail(self, record: CatalogRecord, code: str, reason: str) -> None:
        self.summary.failures.append(Failure(record.line, record.product_id, code, reason))

    def _decide(self, record: CatalogRecord) -> _Item | None:
        if record.problem:
            self._fail(record, "INVALID_ARGUMENT", record.problem)
            return None
        unreadable = ("", "")  # (status, reason) when the image cannot be sent
        try:
            image = read_image(
                self.config.images_dir,
                record.image,
                allow_outside=self.config.allow_images_outside,
                max_bytes=self.config.max_image_bytes,
            )
        except ImageFileError as exc:
            image, unreadable = b"", (exc.code, str(exc))
        digest = _digest(record, image)
        earlier = self.seen.get(record.product_id)
        if earlier is not None:
            if earlier[0] == digest:
                self.summary.duplicates += 1
                return None
            self._fail(
                record,
                "ALREADY_EXISTS",
                f"duplicate product id {record.product_id!r} with other data (first at line {earlier[1]})",
            )
            return None
        self.seen[record.product_id] = (digest, record.line)
        if unreadable[0]:
            self._fail(record, *unreadable)
            return None
        done = self.journal.get(record.product_id)
        if done is not None and done.digest == digest:
            if not done.ok:
                self._fail(record, done.code, done.reason)
                return None
            if record.product_id not in self.untrusted:
                self.summary.already += 1
                self.landed.add(record.product_id)
                return None
            return _Item(record, digest, image, resent=True)
        return _Item(record, digest, image)


def _requests(items: list[_Item]) -> Iterator[ranker_pb2.UpsertProductsRequest]:
    for it in items:
        r = it.record
        yield ranker_pb2.UpsertProductsRequest(
            product=ranker_pb2.Product(
                product_id=r.product_id, category=r.category, metadata=r.metadata, image=it.image
            )
        )


async def _retried(call: Callable[[], Awaitable[T]], method: str, config: IngestConfig) -> T:
    """`call()`, made again with backoff on transient statuses (`config.retries` times); raises the last
    RpcError."""
    pauses = backoff(RETRY_BACKOFF_S, RETRY_BACKOFF_CAP_S)
    attempt = 0
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if not _transient(exc) or attempt == config.retries:
                raise
            attempt += 1
            pause = next(pauses)
            log.warning(
                "%s: %s (%s); retry %d/%d in %.1f s",
                method,
                exc.code().name,
                printable(exc.details()),
                attempt,
                config.retries,
                pause,
            )
            await asyncio.sleep(pause)


async def _send(
    stub: ranker_pb2_grpc.RankerServiceStub, items: list[_Item], config: IngestConfig
) -> ranker_pb2.UpsertProductsResponse:
    """One stream (a new one per attempt), retried on transient statuses."""
    return await _retried(
        lambda: stub.UpsertProducts(_requests(items), timeout=config.stream_timeout_s),
        "UpsertProducts",
        config,
    )


async def catalog_stats(
    stub: ranker_pb2_grpc.RankerServiceStub, wait_s: float = 30.0
) -> ranker_pb2.CatalogStats:
    """The ranker's catalog stats, waiting up to `wait_s` for a ranker that is starting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if not _transient(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def catalog_index(config: IngestConfig) -> tuple[int, dict[str, int]]:
    """The catalog's record count, and for each product id (its first readable record, as the job will
    decide it) the size of its listing in bytes (to size the checks' replies). Raises CatalogError before
    anything is sent."""
    total, sizes = 0, {}
    for record in read_catalog(config.catalog, config.format, config.metadata_columns):
        total += 1
        if not record.problem and record.product_id not in sizes:
            sizes[record.product_id] = len(_listing_json(record.product_id, record.category, record.metadata))
    return total, sizes


def _chunks(ids: list[str], sizes: Mapping[str, int]) -> Iterator[list[str]]:
    """`ids` in order, cut into GetProducts calls: at most CHECK_IDS ids and about CHECK_BYTES of reply."""
    chunk: list[str] = []
    size = 0
    for pid in ids:
        n = sizes.get(pid, len(pid)) + CHECK_OVERHEAD
        if chunk and (len(chunk) == CHECK_IDS or size + n > CHECK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(pid)
        size += n
    if chunk:
        yield chunk


async def _not_held(
    stub: ranker_pb2_grpc.RankerServiceStub,
    expected: Mapping[str, str],
    sizes: Mapping[str, int],
    config: IngestConfig,
) -> tuple[list[str], list[str]]:
    """Of the products `expected` (id -> listing digest; "" checks presence only), those the store lacks
    and those it holds with another listing, each in the order given."""
    lacking: list[str] = []
    other: list[str] = []
    for chunk in _chunks(list(expected), sizes):
        request = ranker_pb2.GetProductsRequest(product_ids=chunk)
        reply = await _retried(
            functools.partial(stub.GetProducts, request, timeout=CHECK_TIMEOUT_S), "GetProducts", config
        )
        lacking.extend(reply.not_found)
        for p in reply.products:
            want = expected[p.product_id]
            if want and want != _listing(p.product_id, p.category, p.metadata):
                other.append(p.product_id)
    return lacking, other


def _examples(ids: list[str], shown: int = 5) -> str:
    """The first few of `ids`, for a log line or the summary (the Summary holds them all)."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(repr(i) for i in ids[:shown]) + more


async def _check_start(
    stub, journal: Journal, sizes: Mapping[str, int], summary: Summary, config: IngestConfig
) -> None:
    """Before sending: which of the catalog's products the journal recorded as ingested does the store not
    hold as recorded? Those are sent again (Summary.lacking, Summary.other)."""
    try:
        summary.lacking, summary.other = await _not_held(stub, journal.ingested(sizes), sizes, config)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        log.warning(OLD_RANKER)
        summary.unchecked = True
    if summary.lacking:
        log.warning(
            "the store lacks %d products the journal recorded as ingested (wiped, restored from an older "
            "copy, deleted): sending them again (%s)",
            len(summary.lacking),
            _examples(summary.lacking),
        )
    if summary.other:
        log.warning(
            "the store holds %d products the journal recorded as ingested with another category or metadata "
            "(restored from an older copy, or written by another source): sending them again (%s)",
            len(summary.other),
            _examples(summary.other),
        )


async def _check_after(
    stub, journal: Journal, sizes: Mapping[str, int], landed: set[str], summary: Summary, config: IngestConfig
) -> None:
    """After the job: does the store hold, as journaled, every product this job ingested or trusted?"""
    if summary.unchecked:  # the ranker cannot be asked (said at the start)
        return
    expected = {pid: journal.outcomes[pid].listing for pid in sizes if pid in landed}
    try:
        lacking, other = await _not_held(stub, expected, sizes, config)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            log.warning(OLD_RANKER)
            return
        summary.stopped = f"{exc.code().name}: {exc.details()} (checking the store after the job)"
        log.error("GetProducts failed: %s", printable(summary.stopped))
        return
    summary.short = lacking + other
    if summary.short:
        log.error(
            "after the job the store lacks %d and holds %d otherwise of the products ingested or found "
            "(products deleted or replaced, or the store replaced, during the job?): run the job again to "
            "send them (%s)",
            len(lacking),
            len(other),
            _examples(summary.short),
        )


async def ingest(config: IngestConfig, channel: grpc.aio.Channel) -> Summary:
    """Runs the job against the ranker behind `channel`; the error report is written before returning."""
    started = time.monotonic()
    total, sizes = await asyncio.to_thread(catalog_index, config)  # CatalogError before anything is sent
    stub = ranker_pb2_grpc.RankerServiceStub(channel)
    stats = await catalog_stats(stub)
    summary = Summary(model_version=stats.model_version)
    journal = Journal(config.journal_path, stats.store, stats.model_version, fresh=config.fresh)
    try:
        await _check_start(stub, journal, sizes, summary, config)
    except BaseException:
        journal.close()
        raise
    landed: set[str] = set()  # what the store should hold at the end: trusted, or sent and acknowledged
    queue: asyncio.Queue[list[_Item] | None] = asyncio.Queue(maxsize=config.streams)
    budget = _ImageBytes(config.max_bytes_in_flight)
    try:
        with progress_bar(total, "ingest", "product") as bar:
            planner = _Planner(config, journal, summary, bar, landed, budget)

            # A batch's images are held only by the queue and one stream (no name keeps them once sent:
            # the budget counts what is held).
            async def produce() -> None:
                try:
                    while True:
                        batch = await asyncio.to_thread(planner.next_batch)
                        if not batch:
                            break
                        await queue.put(batch)
                        del batch
                finally:  # the streams finish what they hold and stop, whatever happened here
                    for _ in range(config.streams):
                        await queue.put(None)

            async def consume() -> None:
                while True:
                    items = await queue.get()
                    if items is None:
                        return
                    size = sum(len(it.image) for it in items)
                    try:
                        if summary.stopped:
                            _not_sent(summary, items, summary.stopped)
                        else:
                            await _stream(stub, items, config, journal, summary, landed)
                        bar.update(len(items))
                    finally:
                        del items
                        budget.give(size)

            await asyncio.gather(produce(), *(consume() for _ in range(config.streams)))
        if not summary.stopped:
            await _check_after(stub, journal, sizes, landed, summary, config)
    finally:
        budget.close()  # a reader waiting for bytes stops (streams that failed give none back)
        journal.close()
        summary.seconds = time.monotonic() - started
        summary.failures.sort(key=lambda f: f.line)
        write_report(config.errors_path, summary.failures)
    return summary


async def _stream(
    stub, items: list[_Item], config: IngestConfig, journal: Journal, summary: Summary, landed: set[str]
) -> None:
    try:
        reply = await _send(stub, items, config)
    except grpc.aio.AioRpcError as exc:
        summary.stopped = f"{exc.code().name}: {exc.details()}"
        log.error(
            "UpsertProducts failed: %s; stopping (run the job again to continue)", printable(summary.stopped)
        )
        _not_sent(summary, items, summary.stopped)
        return
    failed = {f.index: f for f in reply.failures}
    entries = []
    for index, it in enumerate(items):
        f = failed.get(index)
        r = it.record
        if f is None:
            listing = _listing(r.product_id, r.category, r.metadata)
            entries.append((r.product_id, Outcome(it.digest, True, r.line, listing=listing)))
            landed.add(r.product_id)
            summary.resent += it.resent
        else:
            if f.error.code in PERMANENT:  # the same content would fail again: never sent twice
                outcome = Outcome(it.digest, False, r.line, f.error.code, f.error.message)
                entries.append((r.product_id, outcome))
            summary.failures.append(
                Failure(it.record.line, it.record.product_id, f.error.code, f.error.message)
            )
    journal.record(entries)
    summary.ingested += len(items) - len(failed)


def _not_sent(summary: Summary, items: list[_Item], why: str) -> None:
    for it in items:
        summary.failures.append(
            Failure(
                it.record.line, it.record.product_id, "UNAVAILABLE", f"not sent ({why}); run the job again"
            )
        )


def write_report(path: Path, failures: list[Failure]) -> None:
    """The error report: one JSON object per record not ingested (line, product_id, code, reason)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(vars(f)) + "\n" for f in failures), encoding="utf-8")
    os.replace(tmp, path)


def format_summary(config: IngestConfig, summary: Summary) -> str:
    sent_rate = summary.ingested / summary.seconds if summary.seconds else 0.0
    lines = [
        f"catalog {printable(config.catalog)}: {summary.records} records "
        f"(model {printable(summary.model_version)})",
        f"  ingested now          {summary.ingested:>8}",
        f"  already ingested      {summary.already:>8}   (journal {printable(config.journal_path)})",
        f"  re-sent               {summary.resent:>8}   (journaled, but not in the store as journaled)",
        f"  identical duplicates  {summary.duplicates:>8}",
        f"  failed                {len(summary.failures):>8}   (report {printable(config.errors_path)})",
        f"  took {summary.seconds:.1f} s ({sent_rate:.1f} products/s ingested)",
    ]
    if summary.failures:
        by_code: dict[str, int] = {}
        for f in summary.failures:
            by_code[f.code] = by_code.get(f.code, 0) + 1
        lines.append("  failures by status: " + ", ".join(f"{k} {v}" for k, v in sorted(by_code.items())))
    if summary.unchecked:
        lines.append("  journal NOT checked against the store: the ranker has no GetProducts (upgrade it)")
    if summary.lacking:
        lines.append(
            f"  the store lacked {len(summary.lacking)} products the journal recorded as ingested "
            f"({_examples(summary.lacking)}): sent again"
        )
    if summary.other:
        lines.append(
            f"  the store held {len(summary.other)} products the journal recorded as ingested with another "
            f"category or metadata ({_examples(summary.other)}): sent again"
        )
    if summary.short:
        lines.append(
            f"  STORE SHORT: after the job the store lacks or holds otherwise {len(summary.short)} of the "
            f"products ingested ({_examples(summary.short)}; changed during the job?) — run the same command "
            "again to send them"
        )
    if summary.stopped:
        lines.append(f"  STOPPED: {printable(summary.stopped)} — run the same command again to continue")
    return "\n".join(lines)
