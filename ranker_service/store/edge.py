"""The embedded product store: Qdrant's own engine in-process through qdrant-edge-py (DESIGN.md §2).

One shard directory per model version. Beside the engine's files it holds `ctl_store.json`
({"model_version", "dim"}), written atomically before the shard is created, so that a directory made by
another model is refused (VersionMismatch) before any of its data is touched.

Facts about qdrant-edge-py 0.9.0 that shape this module (checked against the installed wheel):
- it raises bare `Exception`s whose message carries the cause: a directory already open elsewhere fails at
  load with "failed to open WAL ...: Can't init WAL: Kind(WouldBlock)" (the WAL holds an exclusive lock,
  also across processes), and a call on a closed shard with "Shard is not initialized";
- `query`, `query_batch`, `count`, `update`, `flush` and `optimize` hold the GIL for the whole call, so a
  worker thread would not free the event loop: calls are made inline, and kept few and batched instead;
- `facet(exact=True)` gives exact counts (checked against a reference after deletes, upserts and optimize);
- `optimize()` builds HNSW only for segments above the indexing threshold (10 MB of vectors by default);
- point ids come back as `uuid.UUID`, vectors as lists of Python floats (float32 values, exact).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe
from numpy.typing import NDArray

from ranker_service.errors import StoreClosed, StoreError, StoreLocked, VersionMismatch
from ranker_service.store._points import (
    METADATA_TERMS,
    UNIT_STORED,
    check_limit,
    check_model,
    condition_terms,
    excluded_point_ids,
    map_errors,
    metadata_terms,
    parse_offset,
    point_ids,
    products,
    query_rows,
    stored_points,
)
from ranker_service.store.base import (
    ATTENTION,
    STYLE,
    Hits,
    Listing,
    ProductPoint,
    ProductStore,
    Query,
)
from ranker_service.store.record import META_FILE
from ranker_service.store.table import ProductTable
from style_model.distances import l2_normalize

log = logging.getLogger(__name__)

_ENGINE_CONFIG_FILE = "edge_config.json"  # written by qdrant-edge when it creates a shard


def _map_errors(action: str, path: Path) -> AbstractContextManager[None]:
    """Translate qdrant-edge's bare exceptions into StoreError subclasses, keeping the cause."""
    return map_errors(lambda exc: _store_error(exc, action, path))


def _store_error(exc: Exception, action: str, path: Path) -> StoreError:
    """The StoreError for an exception of qdrant-edge, told apart by its message."""
    message = str(exc)
    if "Shard is not initialized" in message:
        return StoreClosed(f"the embedded store at {path} is closed ({action})")
    if "WouldBlock" in message or "Can't init WAL" in message:
        return StoreLocked(
            f"the embedded store at {path} is already open in another process or store instance "
            "(qdrant-edge's write-ahead log locks the directory); close that one first, "
            "or point this one at another directory"
        )
    return StoreError(f"qdrant-edge failed to {action} at {path}: {message}")


def _write_meta(path: Path, model_version: str, embedding_dim: int) -> None:
    """Record the model version and dimension atomically (tmp + os.replace): never a half-written file."""
    tmp = path / f".{META_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp"  # unique: two openers never clash
    try:
        with tmp.open("w") as f:
            json.dump({"model_version": model_version, "dim": embedding_dim}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / META_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def _check_meta(path: Path, model_version: str, embedding_dim: int) -> bool:
    """Whether the directory already records this store; raise VersionMismatch if it records another."""
    meta_path = path / META_FILE
    if not meta_path.exists():
        if (path / _ENGINE_CONFIG_FILE).exists():
            raise VersionMismatch(
                f"{path} holds a qdrant-edge shard without {META_FILE}, so its model version is unknown; "
                f"open another directory for model {model_version!r}, or delete this one and re-ingest"
            )
        return False
    try:
        meta = json.loads(meta_path.read_text())
        found_version, found_embedding_dim = str(meta["model_version"]), int(meta["dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"cannot read {meta_path}: {exc}") from exc
    if found_version != model_version:
        raise VersionMismatch(
            f"the embedded store at {path} holds vectors of model {found_version!r}, not {model_version!r}; "
            "a new model needs its own store: use another directory (store_path with {model_version}), "
            "or delete this one and re-ingest the catalog"
        )
    if found_embedding_dim != embedding_dim:
        raise VersionMismatch(
            f"the embedded store at {path} holds {found_embedding_dim}-d vectors, but model "
            f"{model_version!r} makes {embedding_dim}-d ones; use another directory, or delete this one "
            "and re-ingest the catalog"
        )
    return True


def _engine_config(embedding_dim: int, indexing_threshold_kb: int | None) -> qe.EdgeConfig:
    """`style` is HNSW-indexed; `attention` is only stored (m=0: no graph links are built for it)."""
    unindexed = qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000)
    optimizers = (
        None
        if indexing_threshold_kb is None
        else qe.EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb)
    )
    return qe.EdgeConfig(
        vectors={
            STYLE: qe.EdgeVectorParams(size=embedding_dim, distance=qe.Distance.Dot),
            ATTENTION: qe.EdgeVectorParams(
                size=embedding_dim, distance=qe.Distance.Dot, hnsw_config=unindexed
            ),
        },
        optimizers=optimizers,
    )


_CACHED_FILTER_TERMS = 2_000  # larger filters (long exclusion lists, ~140 B each) are built per call


def _filter(query: Query) -> qe.Filter:
    """The engine's filter of `query`; a small one from a bounded cache: a Recommend uses one query's
    filter several times (search, count, certify's rounds), and excluded ids take ~5 µs each to turn into
    point ids. Large ones are not kept: per user exclusion lists rarely repeat, and would pin memory."""
    terms = len(query.exclude_ids) + sum(len(c.any_of) + len(c.none_of) for c in query.conditions)
    return _cached_filter(query) if terms <= _CACHED_FILTER_TERMS else _build_filter(query)


@functools.lru_cache(maxsize=64)
def _cached_filter(query: Query) -> qe.Filter:
    return _build_filter(query)


@functools.lru_cache(maxsize=4)
def _excluded(exclude_ids: tuple[str, ...]) -> qe.HasIdCondition:
    """The engine's condition for a query's exclusions, built once per Recommend (a call's categories and
    store calls share the tuple): 10,000 ids took ~25 ms to hand to the engine each time."""
    return qe.HasIdCondition(set(excluded_point_ids(exclude_ids)))


def _build_filter(query: Query) -> qe.Filter:
    """Category must match; each condition's any_of must hold, none_of must not (a missing key passes)."""
    must: list[Any] = [qe.FieldCondition(key="category", match=qe.MatchValue(query.category))]
    must_not: list[Any] = []
    for condition in query.conditions:
        any_of, none_of = condition_terms(condition)
        if any_of:
            must.append(qe.FieldCondition(key=METADATA_TERMS, match=qe.MatchAny(list(any_of))))
        if none_of:
            must_not.append(qe.FieldCondition(key=METADATA_TERMS, match=qe.MatchAny(list(none_of))))
    if query.exclude_ids:
        must_not.append(_excluded(query.exclude_ids))
    return qe.Filter(must=must, must_not=must_not or None)


class EdgeStore(ProductStore):
    """Products in an embedded qdrant-edge shard: the default store, one directory per model version.

    Open it with `open_edge_store`. The shard's write-ahead log makes each upsert durable when it returns
    and locks the directory, so one process (one store instance) owns it at a time.
    """

    def __init__(self, shard: qe.EdgeShard, path: Path, model_version: str, embedding_dim: int) -> None:
        self._shard: qe.EdgeShard | None = shard
        self.path = path
        self.model_version = model_version
        self.embedding_dim = embedding_dim
        self.description = f"embedded qdrant-edge at {path}"
        self.inline = True
        # Every product as this process stored it (ranker_service/store/table.py says why): searches ask the
        # engine for ids and scores only. Safe because this store is the shard's only writer (its WAL locks
        # the directory).
        self._table = self._load(shard)

    def _load(self, shard: qe.EdgeShard) -> ProductTable:
        table = ProductTable(self.embedding_dim, self.model_version, capacity=shard.info().points_count)
        offset = None
        while True:
            request = qe.ScrollRequest(offset=offset, limit=4096, with_payload=True, with_vector=True)
            with _map_errors("load the products", self.path):
                records, offset = shard.scroll(request)
            for r, point in zip(records, products([(r.vector, r.payload) for r in records], "qdrant-edge")):
                table.put(r.id, point)
            if offset is None:
                return table

    async def normalise_stored(self) -> int:
        """Store as unit vectors the products stored otherwise (by ctl before it normalised what it accepts:
        within 1e-3 of unit length), so that distances and certify's proof hold for them too; how many."""
        off = self._table.not_unit(UNIT_STORED)
        for start in range(0, len(off), 4096):
            points = list(self._table.hits([uuid.UUID(int=i) for i in off[start : start + 4096]]).points)
            await self.upsert(
                [
                    dataclasses.replace(
                        p, style=l2_normalize(p.style), attention_key=l2_normalize(p.attention_key)
                    )
                    for p in points
                ]
            )
        if off:
            log.warning(
                "%s: %d products stored with vectors not of unit length, normalised", self.path, len(off)
            )
        return len(off)

    async def add_missing_terms(self) -> int:
        """Give their METADATA_TERMS to the products written without them (by a ranker older than them:
        a store made before, or written by an older version since), so that filters find them; products
        with the same metadata in one engine update, the event loop's turn between updates. How many."""
        shard = self._live()
        missing = qe.Filter(must=[qe.IsEmptyCondition(key=METADATA_TERMS)])
        groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
        offset = None
        while True:
            request = qe.ScrollRequest(offset=offset, limit=4096, filter=missing, with_payload=False)
            with _map_errors("find products without metadata terms", self.path):
                records, offset = shard.scroll(request)
            for r in records:
                groups.setdefault(tuple(self._table.metadata(r.id).items()), []).append(str(r.id))
            if offset is None:
                break
            await asyncio.sleep(0)
        with _map_errors("add metadata terms", self.path):
            for items, pids in groups.items():
                payload = {METADATA_TERMS: metadata_terms(dict(items))}
                for start in range(0, len(pids), 4096):
                    shard.update(qe.UpdateOperation.set_payload(pids[start : start + 4096], payload))
                    await asyncio.sleep(0)
            if groups:
                shard.flush()
        done = sum(map(len, groups.values()))
        if done:
            log.info("%s: %d products given the metadata terms that filters use", self.path, done)
        return done

    def _live(self) -> qe.EdgeShard:
        """The open shard; StoreClosed once `close()` was called."""
        if self._shard is None:
            raise StoreClosed(f"the embedded store at {self.path} is closed")
        return self._shard

    async def upsert(self, points: Sequence[ProductPoint]) -> None:
        """One engine update for the whole batch; a product listed twice keeps its last version."""
        shard = self._live()
        stored = stored_points(points, self.model_version, self.embedding_dim)
        if not stored:
            return
        engine_points = [
            qe.Point(id=pid, vector=vectors, payload=payload) for pid, vectors, payload in stored
        ]
        with _map_errors("upsert points", self.path):
            shard.update(qe.UpdateOperation.upsert_points(engine_points))
        for (pid, _, _), point in zip(stored, products([(v, pl) for _, v, pl in stored], "qdrant-edge")):
            self._table.put(pid, point)

    async def search(
        self, vectors: NDArray[np.float32], query: Query, limit: int, *, exact: bool = False
    ) -> list[Hits]:
        """All rows in one `query_batch` call (the engine plans them together and holds the GIL once); the
        engine returns ids and scores, the products come from this store's own copy."""
        shard = self._live()
        rows = query_rows(vectors, self.embedding_dim, limit)
        if len(rows) == 0:
            return []
        flt = _filter(query)
        params = qe.SearchParams(exact=True) if exact else None
        requests = [
            qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(row.tolist(), using=STYLE),
                filter=flt,
                params=params,
                with_vector=False,
                with_payload=False,
            )
            for row in rows
        ]
        with _map_errors("search", self.path):
            batches = shard.query_batch(qe.QueryBatchRequest(requests))
        return [self._held([p.id for p in hits], [p.score for p in hits]) for hits in batches]

    def _held(self, ids: Sequence[uuid.UUID], scores: Sequence[float] | None = None) -> Hits:
        """The products the engine named, from this store's own copy."""
        try:
            return self._table.hits(ids, scores)
        except KeyError as exc:
            raise StoreError(
                f"the embedded store at {self.path} returned a point it does not hold: {exc}"
            ) from exc

    async def scroll(
        self, query: Query, limit: int, offset: str | None = None
    ) -> tuple[list[ProductPoint], str | None]:
        """Pages in point-id order; the offset is the first point id of the next page, as a string. The
        engine filters and returns ids; the products come from this store's own copy."""
        shard = self._live()
        check_limit(limit)
        start = None if offset is None else parse_offset(offset)
        request = qe.ScrollRequest(
            offset=start, limit=limit, filter=_filter(query), with_payload=False, with_vector=False
        )
        with _map_errors("scroll", self.path):
            records, next_offset = shard.scroll(request)
        points = list(self._held([r.id for r in records]).points)
        return points, None if next_offset is None else str(next_offset)

    async def retrieve(self, product_ids: Sequence[str]) -> list[ProductPoint]:
        """In the order asked, each product once; unknown ids are left out. From this store's own copy."""
        self._live()
        return list(self._table.hits([i for i in point_ids(product_ids) if i in self._table]).points)

    async def lookup(self, product_ids: Sequence[str]) -> list[Listing]:
        """In the order asked, each product once; unknown ids are left out. From this store's own copy."""
        return [Listing(p.product_id, p.category, p.metadata) for p in await self.retrieve(product_ids)]

    async def delete(self, product_ids: Sequence[str]) -> None:
        shard = self._live()
        ids = point_ids(product_ids)
        if not ids:
            return
        with _map_errors("delete points", self.path):
            shard.update(qe.UpdateOperation.delete_points(ids))
        self._table.remove(ids)

    async def count(self, where: Query | str | None = None, *, exact: bool = True) -> int:
        """From this store's own copy (exact: it is the only writer); a Query with conditions or
        exclusions is counted by the engine (exactly: ~100 ms per 100k products of the category, holding
        the GIL; an estimate: ~0.1 ms)."""
        shard = self._live()
        if where is None:
            return len(self._table)
        if isinstance(where, str):
            return self._table.count(where)
        if not where.conditions and not where.exclude_ids:
            return self._table.count(where.category)
        with _map_errors("count points", self.path):
            return int(shard.count(qe.CountRequest(exact=exact, filter=_filter(where))))

    async def counts_by_category(self) -> dict[str, int]:
        self._live()
        return self._table.counts()

    async def optimize(self) -> None:
        """Run the engine's optimizers (HNSW for `style` on large segments); blocks, ~4 s per 10k points."""
        shard = self._live()
        with _map_errors("optimize", self.path):
            shard.optimize()

    async def check(self) -> None:
        """In-process: the store can serve as long as it is open."""
        self._live()

    async def close(self) -> None:
        """Flush, then release the directory's lock; a second call does nothing."""
        shard, self._shard = self._shard, None
        if shard is None:
            return
        self._table = ProductTable(self.embedding_dim, self.model_version)
        with _map_errors("close", self.path):
            try:
                shard.flush()
            finally:
                shard.close()


async def open_edge_store(
    path: str | Path, model_version: str, embedding_dim: int, *, indexing_threshold_kb: int | None = None
) -> EdgeStore:
    """Open the embedded store at `path`, creating it (directory, shard, `category` index) if missing.

    Raises VersionMismatch when the directory was made for another model version or dimension, and
    StoreLocked when another process or store instance has it open. `indexing_threshold_kb`: segments
    with more vector data than this get an HNSW index on `optimize()` (None keeps the shard's setting;
    qdrant's default is 10 000 KB, below which brute force is as fast).
    """
    check_model(model_version, embedding_dim)
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise StoreError(f"the embedded store path {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    known = _check_meta(root, model_version, embedding_dim)
    if not known:
        _write_meta(root, model_version, embedding_dim)
    config = _engine_config(embedding_dim, indexing_threshold_kb)
    with _map_errors("open the shard", root):
        if (root / _ENGINE_CONFIG_FILE).exists():
            shard = qe.EdgeShard.load(str(root), config)  # with a config, the engine checks compatibility
        else:
            shard = qe.EdgeShard.create(str(root), config)
    try:
        with _map_errors("create the payload indexes", root):
            schema = shard.info().payload_schema
            for field in ("category", METADATA_TERMS):
                if field not in schema:
                    shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
    except BaseException:
        shard.close()
        raise
    store = EdgeStore(shard, root, model_version, embedding_dim)
    try:
        await store.normalise_stored()
        await store.add_missing_terms()
    except BaseException:
        await store.close()
        raise
    return store
