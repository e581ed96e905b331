"""What the ranker does, without gRPC: Recommend on domain types (retrieval.SceneQuery in,
retrieval.Recommendations out), the catalog calls, and UpsertProducts (records.ProductRecord in, read one
at a time; records.Upserted out).

RankerApp holds the state (the model, the store, the retriever, the ingestion budgets); the servicer
(service.py) converts the API's messages to and from these types and maps errors to statuses. One bad record
of an UpsertProducts stream fails alone and is listed in the outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np

from ctl.encoding import ModelInfo
from ctl.serving import Metrics
from ctl.tensors import Scene
from ranker_service.bounds import CALL_ENVELOPE
from ranker_service.byte_budget import ByteBudget
from ranker_service.config import RankerConfig
from ranker_service.encoder_client import EncoderClient
from ranker_service.errors import (
    EncoderUnavailable,
    NotReady,
    StoreError,
    StreamTooLong,
    TooManyStreams,
    VersionMismatch,
)
from ranker_service.records import ProductRecord, RefusedRecord, StreamRecord, Upserted
from ranker_service.retrieval import Recommendations, Retriever, SceneQuery
from ranker_service.retrieval_mode import RetrievalMode
from ranker_service.store.base import Listing, ProductPoint, ProductStore

log = logging.getLogger(__name__)

_IMAGE_ENVELOPE = 16  # per image: the field's tag and length
LINGER_S = 0.2  # a stream that pauses this long has the batch it read so far sent


@dataclass
class _Ready:
    """What exists once the encoder has answered and the store is open."""

    info: ModelInfo
    store: ProductStore
    retriever: Retriever


@dataclass(frozen=True)
class Deleted:
    """What DeleteProducts did: products removed, and the ids asked that the store did not hold."""

    deleted: int
    not_found: list[str]


@dataclass(frozen=True)
class Lookup:
    """What GetProducts found: the products held (no vectors), in the order asked, and the ids not held."""

    products: list[Listing]
    not_found: list[str]


@dataclass(frozen=True)
class CatalogStats:
    """The catalog: products per category, the model that made their vectors, where they live."""

    products_by_category: dict[str, int]
    model_version: str
    store: str

    @property
    def total_products(self) -> int:
        return sum(self.products_by_category.values())


class RankerApp:
    """The ranker's state and logic, usable without gRPC (a caller passes its remaining deadline)."""

    def __init__(self, config: RankerConfig, encoder: EncoderClient, metrics: Metrics):
        self.config = config
        self.encoder = encoder
        self._ready: _Ready | None = None
        self._categories: set[str] = set()  # the catalog's categories (a superset after deletes)
        self.image_bytes = ByteBudget(config.upsert_bytes_in_flight)
        self._upsert_streams = 0  # UpsertProducts streams open
        self._in_flight: Counter[str] = Counter()  # categories of the batches between admitted and stored
        self.waiting_for = "the encoder"  # what start-up waits for, told to callers until ready
        self.candidates = metrics.histogram(
            "ctl_ranker_candidates_scored", "products scored exactly per category of a Recommend", ["mode"]
        )
        self.certify_rounds = metrics.histogram(
            "ctl_ranker_certify_rounds",
            "bound-query rounds until certified",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
        )
        self.upsert_batch = metrics.histogram(
            "ctl_ranker_upsert_batch_size", "points written per store upsert"
        )
        self.records = metrics.counter(
            "ctl_ranker_upsert_records", "UpsertProducts records, by outcome", ["outcome"]
        )

    async def attach(self, info: ModelInfo, store: ProductStore) -> None:
        """Ready to serve: the model is known and the store open; mean keys are computed in the background."""
        retriever = Retriever(
            store,
            max_pool=self.config.max_pool,
            exact_below=self.config.exact_below,
            max_certify_width=self.config.max_certify_width,
        )
        await retriever.warm()
        self._categories = set(await store.counts_by_category())
        self._ready = _Ready(info, store, retriever)

    async def close(self) -> None:
        """Stop background work on the store (before it closes)."""
        if self._ready is not None:
            await self._ready.retriever.close()

    @property
    def ready(self) -> _Ready:
        if self._ready is None:
            raise NotReady(f"the ranker is starting: waiting for {self.waiting_for}; try again later")
        return self._ready

    # --- Recommend -------------------------------------------------------------------------------------

    async def recommend(self, query: SceneQuery, remaining_s: float | None) -> Recommendations:
        """The Asks of `query` answered in order, with `remaining_s` until the caller's deadline."""
        ready = self.ready
        deadline = None if remaining_s is None else time.monotonic() + remaining_s
        asks = [dataclasses.replace(ask, deadline=deadline) for ask in query.asks]
        scene = await self._scene(query.scene, ready.info, remaining_s)
        if ready.store.inline:  # one category after another: the loop gets a turn between their steps
            results = [await ready.retriever.recommend(scene, ask) for ask in asks]
        else:  # a remote store: the categories' queries wait on the network together
            results = await asyncio.gather(*(ready.retriever.recommend(scene, ask) for ask in asks))
        for r in results:
            self.candidates.labels(r.mode.value).observe(r.candidates_scored)
            if r.mode is RetrievalMode.CERTIFY:
                self.certify_rounds.observe(r.rounds)
        return Recommendations(list(results), ready.info.model_version, ready.info.grid)

    async def _scene(self, scene: bytes | Scene, info: ModelInfo, remaining_s: float | None) -> Scene:
        """A precomputed scene as it is (the servicer checked its model and shape), an image encoded."""
        if isinstance(scene, Scene):
            return scene
        encoded, version = await self.encoder.encode_scene(scene, remaining_s)
        if version != info.model_version:
            raise VersionMismatch(
                f"the encoder now serves model {version} but the catalog holds {info.model_version}; "
                "restart the ranker on a store for the new model and re-ingest"
            )
        return encoded

    # --- UpsertProducts --------------------------------------------------------------------------------

    async def upsert(self, records: AsyncIterator[StreamRecord], remaining_s: float | None) -> Upserted:
        """At most `max_upsert_streams` streams at once; one more is refused at once (RESOURCE_EXHAUSTED,
        which ctl ingest retries with backoff) rather than queued: gRPC takes in a waiting stream's first
        records all the same, so each open stream costs memory, several times its largest image
        (measured: ~65 MB with 15 MiB images). `records` is read one record at a time, as they are
        needed."""
        if self._upsert_streams >= self.config.max_upsert_streams:
            raise TooManyStreams(
                f"{self._upsert_streams} UpsertProducts streams are open, the most this ranker takes "
                "(CTL_RANKER_MAX_UPSERT_STREAMS); try again shortly, or send fewer streams at once"
            )
        self._upsert_streams += 1
        try:
            return await self._upsert(records, remaining_s)
        finally:
            self._upsert_streams -= 1

    async def _upsert(self, records: AsyncIterator[StreamRecord], remaining_s: float | None) -> Upserted:
        """Batches of `upsert_batch` records are encoded and written concurrently, at most
        `upsert_concurrency` at a time (the stream is not read further meanwhile), but a product sent twice
        is written in the order sent: a batch waits, before its write, for the earlier batches that hold one
        of its products. So the last record of a product wins, as if the stream were applied one record at a
        time; `upserted` counts distinct products stored. (No deadlock: a batch only waits for earlier
        ones, which hold their slots already.)"""
        ready = self.ready
        outcome = Upserted(ready.info.model_version)
        slots = asyncio.Semaphore(self.config.upsert_concurrency)
        tasks: list[asyncio.Task] = []
        batch: list[tuple[int, ProductRecord]] = []
        batch_bytes = 0
        max_image, _ = self._encoder_limits(ready.info)
        writer: dict[str, asyncio.Task] = {}  # the latest batch holding each product id
        stored: set[str] = set()

        async def flush(
            items: list[tuple[int, ProductRecord]], earlier: set[asyncio.Task], held: list[int]
        ) -> None:
            categories: Counter[str] = Counter()  # what _prepare admits, held until stored
            try:
                points = await self._prepare(items, outcome, ready, remaining_s, categories)
                self.image_bytes.release(held.pop())  # the images are encoded: only vectors are left
                if earlier:
                    await asyncio.wait(earlier)
                await self._store(points, ready)
            finally:
                self._in_flight.subtract(categories)
                self._in_flight += Counter()  # drops the categories no batch holds now
            stored.update(p.product_id for p in points)
            outcome.upserted = len(stored)

        def finished(held: list[int], task: asyncio.Task) -> None:
            # a done callback, not a `finally`: a task cancelled before it ran never runs its coroutine,
            # and the bytes it held would be lost to every stream for good
            self.image_bytes.release(sum(held))
            slots.release()

        async def start(items: list[tuple[int, ProductRecord]], size: int) -> None:
            """Send a batch holding `size` bytes of the budget (given back if it cannot start)."""
            try:
                await slots.acquire()  # back-pressure: stop reading while `upsert_concurrency` batches run
            except BaseException:
                self.image_bytes.release(size)
                raise
            held = [size]
            ids = {r.product_id for _, r in items}
            earlier = {writer[i] for i in ids if i in writer and not writer[i].done()}
            task = asyncio.create_task(flush(items, earlier, held))
            task.add_done_callback(functools.partial(finished, held))
            tasks.append(task)
            writer.update(dict.fromkeys(ids, task))

        batch_held = 0  # bytes of the budget the batch being read holds

        async def send_batch() -> None:
            """Start the batch read so far, with the budget's bytes it holds; the next one starts empty."""
            nonlocal batch, batch_bytes, batch_held
            items, held = batch, batch_held
            batch, batch_bytes, batch_held = [], 0, 0
            await start(items, held)

        async def admit(size: int) -> int:
            """The budget's bytes for a record of `size` read: at once if they are free; else the batch
            read so far is sent first (what it holds comes back once encoded, whatever other streams
            wait for), then the stream waits, reading nothing more meanwhile."""
            granted = self.image_bytes.try_acquire(size)
            if granted is None:
                if batch:
                    await send_batch()
                granted = await self.image_bytes.acquire(size)
            return granted

        reading: asyncio.Future | None = None

        async def next_record() -> StreamRecord | None:
            """The stream's next record (None at its end). While a batch read so far holds part of the
            budget, a caller that pauses (a slow link, or one that keeps its stream open and idle) has it
            sent after LINGER_S: bytes held by an idle stream would stop every other stream's uploads."""
            nonlocal reading
            reading = asyncio.ensure_future(anext(incoming))
            if batch:
                await asyncio.wait({reading}, timeout=LINGER_S)
                if not reading.done():
                    await send_batch()
            try:
                return await reading
            except StopAsyncIteration:
                return None
            finally:
                reading = None

        incoming = aiter(records)
        try:
            too_long = False
            while (record := await next_record()) is not None:
                if outcome.received == self.config.max_stream_records:
                    too_long = True  # what came before is finished below; the rest is not read
                    break
                index = outcome.received
                outcome.received += 1
                if isinstance(record, RefusedRecord):
                    outcome.fail(index, record.product_id, record.code, record.message)
                    continue
                problem = _image_problem(record, max_image)
                if problem:
                    outcome.fail(index, record.product_id, "INVALID_ARGUMENT", problem)
                    continue
                granted = await admit(record.size)
                batch.append((index, record))
                batch_bytes += record.size
                batch_held += granted
                if len(batch) >= self.config.upsert_batch or batch_bytes >= self.config.upsert_batch_bytes:
                    await send_batch()
                    for t in tasks:
                        if t.done() and t.exception() is not None:
                            raise t.exception()
            if batch:
                await send_batch()
            await asyncio.gather(*tasks)
            if too_long:
                limit = self.config.max_stream_records
                raise StreamTooLong(
                    f"a stream may carry at most {limit} products: the first {limit} were processed "
                    f"({outcome.upserted} stored, {len(outcome.failures)} failed{outcome.failure_list()}) "
                    "and the rest was not read; send the remaining products in another stream (ctl ingest "
                    "sends --batch per stream)"
                )
        except StreamTooLong:
            raise
        except BaseException as exc:
            if reading is not None:
                reading.cancel()
            self.image_bytes.release(batch_held)  # read, never sent
            batch_held = 0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(exc, EncoderUnavailable | StoreError):
                raise type(exc)(
                    f"{exc} — {outcome.upserted} of {outcome.received} products were stored before this; "
                    "send the stream again (upserts are idempotent)"
                ) from exc
            raise
        outcome.failures.sort(key=lambda f: f.index)
        self.records.labels("failed").inc(len(outcome.failures))
        log.info(
            "upsert: %d received, %d stored, %d failed",
            outcome.received,
            outcome.upserted,
            len(outcome.failures),
        )
        return outcome

    async def _prepare(
        self,
        items: list[tuple[int, ProductRecord]],
        outcome: Upserted,
        ready: _Ready,
        remaining_s: float | None,
        admitted: Counter[str],
    ) -> list[ProductPoint]:
        """The points of a batch, in record order: embeddings as given (the servicer checked them), images
        encoded; records that cannot be stored are listed in `outcome.failures`."""
        info = ready.info
        points: dict[int, ProductPoint] = {}
        items = await self._admit_categories(items, outcome, ready)
        admitted.update({r.category for _, r in items})
        self._in_flight.update(admitted)  # given back by the caller once stored
        images = [(i, r) for i, r in items if r.image is not None]
        for index, record in items:
            if record.embedding is not None:
                points[index] = _point(record, *record.embedding, info.model_version)
        if images:
            chunks = self._encoder_calls(images, info)
            replies = await asyncio.gather(
                *(self.encoder.encode_products([r.image for _, r in chunk], remaining_s) for chunk in chunks)
            )
            images = [item for chunk in chunks for item in chunk]
            results = [r for chunk, _ in replies for r in chunk]
            for _, version in replies:
                if version != info.model_version:
                    raise VersionMismatch(
                        f"the encoder now serves model {version} but the catalog holds {info.model_version}"
                    )
            for (index, record), r in zip(images, results):
                if r.style is None:
                    outcome.fail(index, record.product_id, r.code, f"image: {r.message}")
                else:
                    points[index] = _point(record, r.style, r.attention_key, info.model_version)
        return [points[i] for i in sorted(points)]  # a product listed twice: the store keeps the last

    def _encoder_limits(self, info: ModelInfo) -> tuple[int, int]:
        """(largest image, most image bytes per EncodeProducts call): what the encoder says it takes
        (ModelInfo: the latest the probe read, as the encoder may restart with other limits) and what
        this ranker's channel sends, less room for the message's framing."""
        latest = self.encoder.info
        if latest is not None and latest.model_version == info.model_version:
            info = latest
        request = min(b for b in (info.max_request_bytes, self.encoder.max_message_bytes) if b)
        per_call = max(1, request - CALL_ENVELOPE)
        return min(info.max_image_bytes or per_call, per_call - _IMAGE_ENVELOPE), per_call

    def _encoder_calls(
        self, images: list[tuple[int, ProductRecord]], info: ModelInfo
    ) -> list[list[tuple[int, ProductRecord]]]:
        """The images split into EncodeProducts calls, in order: at most ModelInfo.max_batch_images per
        call and at most the bytes one call may carry (eight 9.7 MB PNGs are legal images, but not one
        64 MiB call)."""
        _, per_call = self._encoder_limits(info)
        step = max(1, info.max_batch_images)
        chunks: list[list[tuple[int, ProductRecord]]] = []
        size = 0
        for item in images:
            cost = len(item[1].image) + _IMAGE_ENVELOPE
            if not chunks or len(chunks[-1]) >= step or size + cost > per_call:
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += cost
        return chunks

    async def _admit_categories(
        self, items: list[tuple[int, ProductRecord]], outcome: Upserted, ready: _Ready
    ) -> list[tuple[int, ProductRecord]]:
        """The records whose category exists or still fits in the catalog (max_catalog_categories: every
        category is listed in one GetCatalogStats reply); the others fail alone (RESOURCE_EXHAUSTED)."""
        cap = self.config.max_catalog_categories
        new = {r.category for _, r in items} - self._categories
        if not new:
            return items
        if len(self._categories) + len(new) > cap:  # deletes may have emptied some: ask the store
            # (and keep those of other batches admitted but not stored yet, or the cap would let them in
            # twice)
            self._categories = set(await ready.store.counts_by_category()) | set(self._in_flight)
        kept = []
        for index, record in items:
            if record.category not in self._categories:
                if len(self._categories) >= cap:
                    outcome.fail(
                        index,
                        record.product_id,
                        "RESOURCE_EXHAUSTED",
                        f"category {record.category[:64]!r} would be new, and the catalog holds "
                        f"{len(self._categories):,} categories already, the most it may "
                        "(CTL_RANKER_MAX_CATALOG_CATEGORIES)",
                    )
                    continue
                self._categories.add(record.category)
            kept.append((index, record))
        return kept

    async def _store(self, points: list[ProductPoint], ready: _Ready) -> None:
        if points:
            await ready.store.upsert(points)
            ready.retriever.forget({p.category for p in points})
            self.upsert_batch.observe(len(points))
            self.records.labels("stored").inc(len(points))

    # --- DeleteProducts, GetProducts, GetCatalogStats ---------------------------------------------------

    async def delete(self, product_ids: Sequence[str]) -> Deleted:
        """Removes the products of these ids (each once); the ids the store does not hold are listed."""
        ready = self.ready
        found = await ready.store.retrieve(product_ids)
        await ready.store.delete([p.product_id for p in found])
        ready.retriever.forget({p.category for p in found})
        present = {p.product_id for p in found}
        return Deleted(len(present), [p for p in product_ids if p not in present])

    async def get_products(self, product_ids: Sequence[str]) -> Lookup:
        """The stored products among the ids asked (each once), in that order (no vectors), and the rest."""
        found = await self.ready.store.lookup(product_ids)
        present = {p.product_id for p in found}
        return Lookup(list(found), [p for p in product_ids if p not in present])

    async def stats(self) -> CatalogStats:
        ready = self.ready
        counts = await ready.store.counts_by_category()
        return CatalogStats(dict(counts), ready.info.model_version, ready.store.description)

    @property
    def model_info(self) -> ModelInfo:
        """The served model (NotReady until the ranker is)."""
        return self.ready.info


def _image_problem(record: ProductRecord, max_image_bytes: int) -> str:
    """Why a record's image cannot be encoded ("" if it can): an image larger than the encoder takes in one
    call fails here, alone, instead of failing (and being retried in) the whole stream."""
    if record.image is not None and len(record.image) > max_image_bytes:
        return (
            f"image is {len(record.image):,} bytes; the encoder takes at most {max_image_bytes:,} "
            "(ModelInfo.max_image_bytes): make it smaller"
        )
    return ""


def _point(record: ProductRecord, style, attention_key, version: str) -> ProductPoint:
    return ProductPoint(
        product_id=record.product_id,
        category=record.category,
        style=np.asarray(style, dtype=np.float32),
        attention_key=np.asarray(attention_key, dtype=np.float32),
        metadata=record.metadata,
        model_version=version,
    )
