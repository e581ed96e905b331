"""`ctl ingest`: stream a product catalog to the ranker's UpsertProducts, resumably.

The catalog is read twice, in order: once for its ids and categories (the progress total, and the check
below), then for sending. Each record is decided before anything is sent: unreadable ones, missing image
files and duplicate ids with different data fail here; records the journal already holds with the same
content are skipped; the rest go out in batches, one UpsertProducts stream per batch,
`streams` batches in flight. Outcomes are journaled only once the ranker has answered for the whole
stream, so a killed job loses at most the batches in flight (sent again on the next run: upserts are
idempotent). A stream that fails on UNAVAILABLE and the like is retried with backoff; if it still fails
the job stops sending, and every record not ingested is listed in the error report with the reason.

The journal is checked against the store, at the start and at the end. The store can have lost what the
journal says landed (wiped, restored from an older copy, products deleted through DeleteProducts) while
the target's name and model version stay the same. At the start, for each category, the number of the
catalog's products the journal records as ingested is compared with the store's count
(GetCatalogStats): a store that holds fewer cannot hold them all, so the journal is not trusted for that
category and its journaled records are sent again (upserts are idempotent), with a warning that says so.
A store that holds more (products from other sources) is fine. At the end the same comparison tells
whether the store still holds what was ingested (it may have changed during the job): if not, the job
says so and exits non-zero, and a rerun sends what is missing. Counts cannot see a product deleted from
a category that other sources filled back up; a per-product check would need a presence query in the
ranker's API, which has none.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ctl.ingest.catalog import CatalogRecord, read_catalog
from ctl.ingest.journal import Journal, Outcome
from ctl.progress import progress_bar
from ctl.v1 import ranker_pb2, ranker_pb2_grpc

log = logging.getLogger(__name__)

# Record failures that depend only on the record (a corrupt image...): journaled, not retried by a rerun.
# Any other status of a record (RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL...) is reported, and sent again
# by the next run.
PERMANENT = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "ALREADY_EXISTS", "OUT_OF_RANGE"}
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True)
class IngestConfig:
    """One ingestion job."""

    catalog: Path
    images: Path | None = None  # folder the image paths are relative to (default: the catalog's)
    format: str | None = None  # jsonl | csv (default: from the suffix)
    metadata_columns: tuple[str, ...] = ()
    batch: int = 64  # records per UpsertProducts stream
    streams: int = 4  # streams in flight
    journal: Path | None = None  # default: CATALOG.journal
    errors: Path | None = None  # default: CATALOG.errors.jsonl
    fresh: bool = False  # forget the journal
    retries: int = 5  # per stream, on UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED / ABORTED
    stream_timeout_s: float = 600.0

    def __post_init__(self):
        for name in ("batch", "streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        if self.retries < 0:
            raise ValueError(f"retries={self.retries}: expected 0 or more")

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
    already: int = 0  # skipped: the journal holds the same content
    resent: int = 0  # of `ingested`: journaled, sent again (the store held fewer of their category)
    duplicates: int = 0  # skipped: an identical earlier record of the catalog
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # why the job stopped sending, if it did
    model_version: str = ""
    # category -> (products in the store, products the journal recorded as ingested), where the store held
    # fewer: at the start (those categories were sent again), and after the job (the store lost some since)
    untrusted: dict[str, tuple[int, int]] = field(default_factory=dict)
    short: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.stopped and not self.short


@dataclass(frozen=True)
class _Item:
    record: CatalogRecord
    digest: str
    image: bytes
    resent: bool = False  # the journal holds it, but its category was not trusted


def _digest(record: CatalogRecord, image: bytes) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([record.product_id, record.category, sorted(record.metadata.items())]).encode())
    h.update(b"\0")
    h.update(image)
    return h.hexdigest()[:32]


class _Planner:
    """Walks the catalog and decides each record: fail, skip, or send (with its image bytes)."""

    def __init__(self, config: IngestConfig, journal: Journal, summary: Summary, bar):
        self.config = config
        self.journal = journal
        self.summary = summary
        self.bar = bar
        self.untrusted = set(summary.untrusted)  # categories whose journaled records are sent again
        self.records: Iterator[CatalogRecord] = read_catalog(
            config.catalog, config.format, config.metadata_columns
        )
        self.seen: dict[str, tuple[str, int]] = {}  # product id -> (digest, line)

    def next_batch(self) -> list[_Item]:
        """Up to `batch` records to send ([] at the end of the catalog)."""
        batch: list[_Item] = []
        for record in self.records:
            self.summary.records += 1
            item = self._decide(record)
            if item is None:
                self.bar.update(1)
                continue
            batch.append(item)
            if len(batch) >= self.config.batch:
                break
        return batch

    def _fail(self, record: CatalogRecord, code: str, reason: str) -> None:
        self.summary.failures.append(Failure(record.line, record.product_id, code, reason))

    def _decide(self, record: CatalogRecord) -> _Item | None:
        if record.problem:
            self._fail(record, "INVALID_ARGUMENT", record.problem)
            return None
        path = Path(record.image)
        if not path.is_absolute():
            path = self.config.images_dir / path
        unreadable = ("", "")  # (status, reason) when the image cannot be sent
        try:
            image = path.read_bytes()
        except OSError as exc:
            image = b""
            unreadable = ("NOT_FOUND", f"image {str(path)!r}: {exc.strerror or exc}")
        else:
            if not image:
                unreadable = ("INVALID_ARGUMENT", f"image {str(path)!r} is an empty file")
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
            if record.category not in self.untrusted:
                self.summary.already += 1
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


async def _send(
    stub: ranker_pb2_grpc.RankerServiceStub, items: list[_Item], config: IngestConfig
) -> ranker_pb2.UpsertProductsResponse:
    """One stream, retried with backoff on transient statuses; raises the last RpcError."""
    delay = 0.5
    for attempt in range(config.retries + 1):
        try:
            return await stub.UpsertProducts(_requests(items), timeout=config.stream_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or attempt == config.retries:
                raise
            log.warning(
                "UpsertProducts: %s (%s); retry %d/%d in %.1f s",
                exc.code().name,
                exc.details(),
                attempt + 1,
                config.retries,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


async def catalog_stats(
    stub: ranker_pb2_grpc.RankerServiceStub, wait_s: float = 30.0
) -> ranker_pb2.CatalogStats:
    """The ranker's catalog stats, waiting up to `wait_s` for a ranker that is starting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await stub.GetCatalogStats(ranker_pb2.GetCatalogStatsRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def catalog_index(config: IngestConfig) -> tuple[int, dict[str, str]]:
    """The catalog's record count, and the category of each product id as the job will decide it (its
    first readable record). Raises CatalogError before anything is sent."""
    total, categories = 0, {}
    for record in read_catalog(config.catalog, config.format, config.metadata_columns):
        total += 1
        if not record.problem:
            categories.setdefault(record.product_id, record.category)
    return total, categories


def fewer_in_store(
    journal: Journal, catalog: dict[str, str], stats: ranker_pb2.CatalogStats
) -> dict[str, tuple[int, int]]:
    """Categories where the store holds fewer products than the journal says landed from this catalog:
    category -> (in the store, journaled as ingested)."""
    held = stats.products_by_category
    return {
        category: (held.get(category, 0), count)
        for category, count in sorted(journal.ingested_by_category(catalog).items())
        if held.get(category, 0) < count
    }


def _distrust(summary: Summary, untrusted: dict[str, tuple[int, int]]) -> None:
    summary.untrusted = untrusted
    for category, (held, count) in untrusted.items():
        log.warning(
            "the store holds %d products of %r but the journal recorded %d ingested: "
            "re-sending the catalog's records of %r",
            held,
            category,
            count,
            category,
        )


async def _check_after(stub, journal: Journal, catalog: dict[str, str], summary: Summary) -> None:
    """After the job: does the store hold (at least) what the journal says landed?"""
    try:
        stats = await catalog_stats(stub)
    except grpc.aio.AioRpcError as exc:
        summary.stopped = f"{exc.code().name}: {exc.details()} (asking the store's counts after the job)"
        log.error("GetCatalogStats failed: %s", summary.stopped)
        return
    summary.short = fewer_in_store(journal, catalog, stats)
    for category, (held, count) in summary.short.items():
        log.error(
            "after the job the store holds %d products of %r but %d were ingested (products deleted or the "
            "store replaced during the job?): run the job again to send them",
            held,
            category,
            count,
        )


async def ingest(config: IngestConfig, channel: grpc.aio.Channel) -> Summary:
    """Runs the job against the ranker behind `channel`; the error report is written before returning."""
    started = time.monotonic()
    total, catalog = await asyncio.to_thread(catalog_index, config)  # CatalogError before anything is sent
    stub = ranker_pb2_grpc.RankerServiceStub(channel)
    stats = await catalog_stats(stub)
    summary = Summary(model_version=stats.model_version)
    journal = Journal(config.journal_path, stats.store, stats.model_version, fresh=config.fresh)
    _distrust(summary, fewer_in_store(journal, catalog, stats))
    queue: asyncio.Queue[list[_Item] | None] = asyncio.Queue(maxsize=config.streams)
    try:
        with progress_bar(total, "ingest", "product") as bar:
            planner = _Planner(config, journal, summary, bar)

            async def produce() -> None:
                try:
                    while batch := await asyncio.to_thread(planner.next_batch):
                        await queue.put(batch)
                finally:  # the streams finish what they hold and stop, whatever happened here
                    for _ in range(config.streams):
                        await queue.put(None)

            async def consume() -> None:
                while (items := await queue.get()) is not None:
                    if summary.stopped:
                        _not_sent(summary, items, summary.stopped)
                    else:
                        await _stream(stub, items, config, journal, summary)
                    bar.update(len(items))

            await asyncio.gather(produce(), *(consume() for _ in range(config.streams)))
        if not summary.stopped:
            await _check_after(stub, journal, catalog, summary)
    finally:
        journal.close()
        summary.seconds = time.monotonic() - started
        summary.failures.sort(key=lambda f: f.line)
        write_report(config.errors_path, summary.failures)
    return summary


async def _stream(stub, items: list[_Item], config: IngestConfig, journal: Journal, summary: Summary) -> None:
    try:
        reply = await _send(stub, items, config)
    except grpc.aio.AioRpcError as exc:
        summary.stopped = f"{exc.code().name}: {exc.details()}"
        log.error("UpsertProducts failed: %s; stopping (run the job again to continue)", summary.stopped)
        _not_sent(summary, items, summary.stopped)
        return
    failed = {f.index: f for f in reply.failures}
    entries = []
    for index, it in enumerate(items):
        f = failed.get(index)
        category = it.record.category
        if f is None:
            outcome = Outcome(it.digest, True, it.record.line, category=category)
            entries.append((it.record.product_id, outcome))
            summary.resent += it.resent
        else:
            if f.error.code in PERMANENT:  # the same content would fail again: never sent twice
                outcome = Outcome(it.digest, False, it.record.line, f.error.code, f.error.message, category)
                entries.append((it.record.product_id, outcome))
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
        f"catalog {config.catalog}: {summary.records} records (model {summary.model_version})",
        f"  ingested now          {summary.ingested:>8}",
        f"  already ingested      {summary.already:>8}   (journal {config.journal_path})",
        f"  re-sent               {summary.resent:>8}   (journaled; the store held fewer of their category)",
        f"  identical duplicates  {summary.duplicates:>8}",
        f"  failed                {len(summary.failures):>8}   (report {config.errors_path})",
        f"  took {summary.seconds:.1f} s ({sent_rate:.1f} products/s ingested)",
    ]
    if summary.failures:
        by_code: dict[str, int] = {}
        for f in summary.failures:
            by_code[f.code] = by_code.get(f.code, 0) + 1
        lines.append("  failures by status: " + ", ".join(f"{k} {v}" for k, v in sorted(by_code.items())))
    lines += _by_category(
        summary.untrusted,
        "  the store held {held} products of {category!r} but the journal recorded {count} ingested: "
        "re-sending its records",
    )
    lines += _by_category(
        summary.short,
        "  STORE SHORT: the store holds {held} products of {category!r} but {count} were ingested "
        "(changed during the job?) — run the same command again to send them",
    )
    if summary.stopped:
        lines.append(f"  STOPPED: {summary.stopped} — run the same command again to continue")
    return "\n".join(lines)


def _by_category(counts: dict[str, tuple[int, int]], template: str, shown: int = 10) -> list[str]:
    """One line per category (the first `shown`; the log has them all)."""
    lines = [
        template.format(category=category, held=held, count=count)
        for category, (held, count) in list(counts.items())[:shown]
    ]
    if len(counts) > shown:
        lines.append(f"  ... and {len(counts) - shown} more categories (see the log)")
    return lines
