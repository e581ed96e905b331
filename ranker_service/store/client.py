"""The product store on a Qdrant server or cluster, through qdrant-client's async API (DESIGN.md §2).

This is how the catalog scales past one machine (sharding, replication, API key, TLS). The same adapter runs
against qdrant-client's local mode (`location=":memory:"` or `path=`), which the conformance tests use;
local mode is brute force in Python, so it is never the serving default.

The model version and dimension are recorded in the collection's own `metadata` (Qdrant 1.16+, also kept by
local mode): no marker point pollutes counts, facets or search results. A collection without them was not
made by this adapter (or by a server too old to keep collection metadata) and is refused.

The name given may be an alias (a new model means a new collection, switched by alias: DESIGN.md §2). The
store resolves it when it opens and works on that collection; `check()` (the ranker's probe) resolves it
again and reads the metadata of the collection behind it. Another model's collection there (the alias
moved, or the collection made again under the same name) makes check() raise VersionMismatch, and every
call refuses the same way until the name leads to a collection of this model again; one of this model
(re-ingested into a new collection) is followed. So the store never reads or writes another model's
vectors through a moved alias.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ranker_service.errors import StoreClosed, StoreError, StoreLocked, VersionMismatch
from ranker_service.store._points import (
    FACET_START,
    METADATA_TERMS,
    UNIT_STORED,
    check_limit,
    check_model,
    condition_terms,
    excluded_point_ids,
    hits,
    in_order,
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
from style_model.distances import l2_normalize

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)

UNIT_VECTORS = "unit_vectors"  # collection metadata: every stored vector is of unit length


def _map_errors(action: str, where: str) -> AbstractContextManager[None]:
    """Translate qdrant-client, httpx, grpc and local-mode errors into StoreError subclasses (cause kept)."""
    return map_errors(lambda exc: _store_error(exc, action, where))


def _store_error(exc: Exception, action: str, where: str) -> StoreError:
    """The StoreError for an exception of qdrant-client (or of the transport or local mode under it)."""
    # ResponseHandlingException: the request never got an answer (refused, DNS, timeout, TLS).
    if isinstance(exc, ResponseHandlingException):
        return StoreError(f"cannot reach Qdrant at {where} ({action}): {exc.source!r}")
    if isinstance(exc, UnexpectedResponse):
        return StoreError(
            f"Qdrant at {where} answered {exc.status_code} {exc.reason_phrase} to {action}: "
            f"{exc.content[:200]!r}"
        )
    message = str(exc)
    if "already accessed by another instance" in message:  # local mode's portalocker on its folder
        return StoreLocked(
            f"the qdrant-client local store at {where} is already open in another process or "
            "store instance; close that one first, or use another path"
        )
    if "instance is closed" in message:
        return StoreClosed(f"the store at {where} is closed ({action})")
    return StoreError(f"Qdrant at {where} failed to {action}: {exc!r}")


def _filter(query: Query) -> qm.Filter:
    """Category must match; each condition's any_of must hold, none_of must not (a missing key passes)."""
    must: list[qm.Condition] = [qm.FieldCondition(key="category", match=qm.MatchValue(value=query.category))]
    must_not: list[qm.Condition] = []
    for condition in query.conditions:
        any_of, none_of = condition_terms(condition)
        if any_of:
            must.append(qm.FieldCondition(key=METADATA_TERMS, match=qm.MatchAny(any=list(any_of))))
        if none_of:
            must_not.append(qm.FieldCondition(key=METADATA_TERMS, match=qm.MatchAny(any=list(none_of))))
    if query.exclude_ids:
        ids: list[qm.ExtendedPointId] = list(excluded_point_ids(query.exclude_ids))
        must_not.append(qm.HasIdCondition(has_id=ids))
    return qm.Filter(must=must, must_not=must_not or None)


_LISTED = ("product_id", "category", "metadata")  # the payload fields of a Listing


def _listing(payload: Mapping[str, Any] | None) -> Listing:
    if not payload or "product_id" not in payload or "category" not in payload:
        raise StoreError("Qdrant returned a point without its product id or category")
    return Listing(payload["product_id"], payload["category"], dict(payload.get("metadata") or {}))


class QdrantClientStore(ProductStore):
    """Products in one Qdrant collection, reached with qdrant-client's AsyncQdrantClient.

    Open it with `open_client_store`. Writes wait for the server to apply them (`wait=True`), so an
    upsert is durable (per the server's WAL) when it returns. `optimize()` is a no-op: the server indexes
    by itself once a segment passes its indexing threshold.
    """

    def __init__(
        self,
        client: AsyncQdrantClient,
        collection: str,
        where: str,
        model_version: str,
        embedding_dim: int,
        *,
        local: bool,
        name: str | None = None,
    ) -> None:
        self._client: AsyncQdrantClient | None = client
        self.name = name or collection  # as configured: a collection or an alias
        self.collection = collection  # the collection behind it when last checked: every call goes there
        self._where = where
        self._local = local
        self.model_version = model_version
        self.embedding_dim = embedding_dim
        self._refusal = ""  # why calls are refused (another model's collection behind the name), or ""
        self.description = ""
        self._describe()

    def _describe(self) -> None:
        alias = f" (behind alias {self.name!r})" if self.name != self.collection else ""
        self.description = f"qdrant collection {self.collection!r}{alias} at {self._where}"

    def _open(self) -> AsyncQdrantClient:
        """The client; StoreClosed once `close()` was called."""
        if self._client is None:
            raise StoreClosed(f"the store on collection {self.name!r} at {self._where} is closed")
        return self._client

    def _live(self) -> AsyncQdrantClient:
        """The open client; StoreClosed once `close()` was called, VersionMismatch while the last check
        found another model's collection behind the name."""
        client = self._open()
        if self._refusal:
            raise VersionMismatch(self._refusal)
        return client

    async def upsert(self, points: Sequence[ProductPoint]) -> None:
        """One request for the whole batch; a product listed twice keeps its last version."""
        client = self._live()
        structs = [
            qm.PointStruct(id=pid, vector=vectors, payload=payload)
            for pid, vectors, payload in stored_points(points, self.model_version, self.embedding_dim)
        ]
        if not structs:
            return
        with _map_errors("upsert points", self._where):
            await client.upsert(self.collection, structs, wait=True)

    async def search(
        self, vectors: NDArray[np.float32], query: Query, limit: int, *, exact: bool = False
    ) -> list[Hits]:
        """All rows in one `query_batch_points` request."""
        client = self._live()
        rows = query_rows(vectors, self.embedding_dim, limit)
        if len(rows) == 0:
            return []
        flt = _filter(query)
        # Local mode is always brute force and warns about search params it ignores, so none are sent there.
        params = qm.SearchParams(exact=True) if exact and not self._local else None
        requests = [
            qm.QueryRequest(
                query=row.tolist(),
                using=STYLE,
                filter=flt,
                params=params,
                limit=limit,
                with_vector=True,
                with_payload=True,
            )
            for row in rows
        ]
        with _map_errors("search", self._where):
            responses = await client.query_batch_points(self.collection, requests)
        return [
            hits([p.score for p in r.points], [(p.vector, p.payload) for p in r.points], "Qdrant")
            for r in responses
        ]

    async def scroll(
        self, query: Query, limit: int, offset: str | None = None
    ) -> tuple[list[ProductPoint], str | None]:
        """Pages in point-id order; the offset is the first point id of the next page, as a string."""
        client = self._live()
        check_limit(limit)
        start = None if offset is None else parse_offset(offset)
        with _map_errors("scroll", self._where):
            records, next_offset = await client.scroll(
                self.collection,
                scroll_filter=_filter(query),
                limit=limit,
                offset=start,
                with_payload=True,
                with_vectors=True,
            )
        points = products([(r.vector, r.payload) for r in records], "Qdrant")
        return points, None if next_offset is None else str(next_offset)

    async def retrieve(self, product_ids: Sequence[str]) -> list[ProductPoint]:
        """In the order asked, each product once; unknown ids are left out."""
        client = self._live()
        ids = point_ids(product_ids)
        if not ids:
            return []
        with _map_errors("retrieve points", self._where):
            records = await client.retrieve(self.collection, ids, with_payload=True, with_vectors=True)
        found = dict(
            zip((str(r.id) for r in records), products([(r.vector, r.payload) for r in records], "Qdrant"))
        )
        return in_order(ids, found)

    async def lookup(self, product_ids: Sequence[str]) -> list[Listing]:
        """In the order asked, each product once; unknown ids are left out. The payload only, no vectors."""
        client = self._live()
        ids = point_ids(product_ids)
        if not ids:
            return []
        with _map_errors("look up points", self._where):
            records = await client.retrieve(
                self.collection, ids, with_payload=list(_LISTED), with_vectors=False
            )
        found = {str(r.id): _listing(r.payload) for r in records}
        return [found[i] for i in ids if i in found]

    async def delete(self, product_ids: Sequence[str]) -> None:
        client = self._live()
        ids: list[qm.ExtendedPointId] = list(point_ids(product_ids))
        if not ids:
            return
        with _map_errors("delete points", self._where):
            await client.delete(self.collection, qm.PointIdsList(points=ids), wait=True)

    async def count(self, where: Query | str | None = None, *, exact: bool = True) -> int:
        client = self._live()
        flt = None if where is None else _filter(Query(where) if isinstance(where, str) else where)
        with _map_errors("count points", self._where):
            result = await client.count(self.collection, count_filter=flt, exact=exact)
        return int(result.count)

    async def counts_by_category(self) -> dict[str, int]:
        """An exact facet on `category`; asks again with a larger limit while the answer is full."""
        client = self._live()
        limit = FACET_START
        while True:
            with _map_errors("count categories", self._where):
                response = await client.facet(self.collection, "category", limit=limit, exact=True)
            if len(response.hits) < limit:
                return {str(h.value): int(h.count) for h in response.hits if h.count > 0}
            limit *= 2

    async def optimize(self) -> None:
        """Nothing to do: a Qdrant server builds HNSW by itself, and local mode has no index."""
        self._live()

    async def check(self) -> None:
        """The server answers, and the name still leads to a collection of this model (a few light
        requests: aliases, existence, collection info; no scan). VersionMismatch when it leads to another
        model's: remembered, so every call refuses until a check finds this model's collection again.
        A collection of this model behind a moved alias is followed from now on."""
        client = self._open()
        with _map_errors("check the collection", self._where):
            target = await _resolve(client, self.name)
            exists = await client.collection_exists(target)
        if not exists:
            raise StoreError(
                f"the collection {_named(target, self.name)} at {self._where} is gone (deleted?)"
            )
        try:
            info = await _check_collection(
                client, target, self.name, self._where, self.model_version, self.embedding_dim
            )
        except VersionMismatch as exc:
            if str(exc) != self._refusal:
                log.error("%s: refusing every call until it is fixed", exc)
            self._refusal = str(exc)
            raise
        if target != self.collection:
            metadata = info.config.metadata or {}
            if not metadata.get(UNIT_VECTORS):  # made before vectors were normalised: as at open
                await _normalise_stored(client, target, self._where, metadata)
            log.warning(
                "%r now leads to collection %r (model %s, as before): following it from %r",
                self.name,
                target,
                self.model_version,
                self.collection,
            )
            self.collection = target
            self._describe()
        if self._refusal:
            log.warning("%s serves model %s again: calls are answered", self.description, self.model_version)
            self._refusal = ""

    async def close(self) -> None:
        """Close the connection (local mode: release the folder's lock); a second call does nothing."""
        client, self._client = self._client, None
        if client is None:
            return
        with _map_errors("close", self._where):
            await client.close()


async def _ensure_collection(
    client: AsyncQdrantClient,
    collection: str,
    where: str,
    model_version: str,
    embedding_dim: int,
    *,
    local: bool,
    shards: int | None = None,
    replication_factor: int | None = None,
) -> str:
    """Create the collection if missing (the embedded store's schema, with the cluster's shard count and
    replication factor; None: the server's defaults), then check its version and dimension. `collection` may
    be an alias: returns the collection behind it."""
    with _map_errors(f"look up collection {collection!r}", where):
        exists = await client.collection_exists(collection)
    if not exists:
        unindexed = qm.HnswConfigDiff(m=0)  # attention is only stored: no graph links for it
        try:
            with _map_errors(f"create collection {collection!r}", where):
                await client.create_collection(
                    collection,
                    vectors_config={
                        STYLE: qm.VectorParams(size=embedding_dim, distance=qm.Distance.DOT),
                        ATTENTION: qm.VectorParams(
                            size=embedding_dim, distance=qm.Distance.DOT, hnsw_config=unindexed
                        ),
                    },
                    metadata={
                        "model_version": model_version,
                        "dim": embedding_dim,
                        UNIT_VECTORS: True,
                    },
                    shard_number=shards,
                    replication_factor=replication_factor,
                )
        except StoreError:
            # Another process may have created it meanwhile: then check that one, else report the failure.
            with _map_errors(f"look up collection {collection!r}", where):
                if not await client.collection_exists(collection):
                    raise
    with _map_errors(f"look up collection {collection!r}", where):
        target = await _resolve(client, collection)
    info = await _check_collection(client, target, collection, where, model_version, embedding_dim)
    metadata = dict(info.config.metadata or {})
    if not metadata.get(UNIT_VECTORS):
        await _normalise_stored(client, target, where, metadata)
        metadata[UNIT_VECTORS] = True
    # Also when the collection exists: its creator may have stopped before making the indexes.
    # Local mode has no payload indexes (it warns that they have no effect), so none is asked for there.
    for field in ("category", METADATA_TERMS):
        if not local and field not in (info.payload_schema or {}):
            with _map_errors(f"create the {field} index", where):
                await client.create_payload_index(
                    target, field, field_schema=qm.PayloadSchemaType.KEYWORD, wait=True
                )
    await _add_missing_terms(client, target, where)
    return target


async def _add_missing_terms(client: AsyncQdrantClient, collection: str, where: str) -> None:
    """Give their METADATA_TERMS to the products written without them (by a ranker older than them: a
    collection made before, or written by an older replica since, as in a rolling update), so that
    filters find them; products with the same metadata in one operation. At every start: finding none
    is one filtered scroll."""
    missing = qm.Filter(must=[qm.IsEmptyCondition(is_empty=qm.PayloadField(key=METADATA_TERMS))])
    done, offset = 0, None
    while True:
        with _map_errors(f"read collection {collection!r}", where):
            records, offset = await client.scroll(
                collection,
                scroll_filter=missing,
                limit=1024,
                offset=offset,
                with_payload=["metadata"],
                with_vectors=False,
            )
        groups: dict[tuple[tuple[str, str], ...], list[qm.ExtendedPointId]] = {}
        for r in records:
            groups.setdefault(tuple(((r.payload or {}).get("metadata") or {}).items()), []).append(r.id)
        if groups:
            operations = [
                qm.SetPayloadOperation(
                    set_payload=qm.SetPayload(
                        payload={METADATA_TERMS: metadata_terms(dict(items))}, points=ids
                    )
                )
                for items, ids in groups.items()
            ]
            with _map_errors(f"add metadata terms to collection {collection!r}", where):
                await client.batch_update_points(collection, operations, wait=True)
            done += len(records)
        if offset is None:
            break
    if done:
        log.info(
            "collection %r at %s: %d products given the metadata terms filters use", collection, where, done
        )


async def _normalise_stored(
    client: AsyncQdrantClient, collection: str, where: str, metadata: dict[str, Any]
) -> None:
    """Once per collection made before ctl normalised what it accepts (within 1e-3 of unit length, stored
    as given): its vectors off unit length become unit vectors, payloads untouched, and the collection's
    metadata records that it was done (`unit_vectors`)."""
    fixed, offset = 0, None
    while True:
        with _map_errors(f"read collection {collection!r}", where):
            records, offset = await client.scroll(
                collection, limit=1024, offset=offset, with_payload=False, with_vectors=True
            )
        updates = []
        for r in records:
            vectors = r.vector if isinstance(r.vector, Mapping) else {}
            off = {
                name: l2_normalize(np.asarray(vectors[name], dtype=np.float64)).astype(np.float32).tolist()
                for name in (STYLE, ATTENTION)
                if name in vectors and abs(np.linalg.norm(vectors[name]) - 1.0) > UNIT_STORED
            }
            if off:
                updates.append(qm.PointVectors(id=r.id, vector=off))
        if updates:
            with _map_errors(f"normalise vectors of collection {collection!r}", where):
                await client.update_vectors(collection, points=updates, wait=True)
            fixed += len(updates)
        if offset is None:
            break
    if fixed:
        log.warning(
            "collection %r at %s: %d products had vectors not of unit length: normalised",
            collection,
            where,
            fixed,
        )
    with _map_errors(f"update collection {collection!r}", where):
        await client.update_collection(collection, metadata={**metadata, UNIT_VECTORS: True})


async def _resolve(client: AsyncQdrantClient, name: str) -> str:
    """The collection `name` leads to: the one an alias of that name points at, else `name` itself
    (Qdrant resolves aliases first too)."""
    for alias in (await client.get_aliases()).aliases:
        if alias.alias_name == name:
            return alias.collection_name
    return name


def _named(collection: str, name: str) -> str:
    """How messages name a collection: with the alias that led to it, if any."""
    return repr(collection) if collection == name else f"{collection!r} (behind alias {name!r})"


async def _check_collection(
    client: AsyncQdrantClient, collection: str, name: str, where: str, model_version: str, embedding_dim: int
) -> qm.CollectionInfo:
    """The collection's info; VersionMismatch unless its metadata and vectors are this model's (`name`:
    the alias that led to it, or the collection's own name)."""
    named = _named(collection, name)
    with _map_errors(f"read collection {collection!r}", where):
        info = await client.get_collection(collection)
    metadata = info.config.metadata or {}
    if "model_version" not in metadata or "dim" not in metadata:
        raise VersionMismatch(
            f"collection {named} at {where} records no model version (it was not made by this "
            "adapter, or the server is older than Qdrant 1.16, which keeps collection metadata); "
            "use another collection name, or delete it and re-ingest"
        )
    found_version, found_embedding_dim = str(metadata["model_version"]), int(metadata["dim"])
    if found_version != model_version:
        raise VersionMismatch(
            f"collection {named} at {where} holds vectors of model {found_version!r}, not "
            f"{model_version!r}; a new model needs its own collection (switch an alias to it once "
            "ingested, and serve it with that model's encoder), or delete this one and re-ingest the catalog"
        )
    params = info.config.params.vectors
    sizes = {n: v.size for n, v in params.items()} if isinstance(params, Mapping) else {}
    if any(d != embedding_dim for d in (found_embedding_dim, sizes.get(STYLE), sizes.get(ATTENTION))):
        raise VersionMismatch(
            f"collection {named} at {where} holds {found_embedding_dim}-d vectors (named vectors: {sizes}), "
            f"but model {model_version!r} makes {embedding_dim}-d {STYLE!r} and {ATTENTION!r} vectors; "
            "use another collection, or delete it and re-ingest the catalog"
        )
    return info


async def open_client_store(
    url: str | None,
    model_version: str,
    embedding_dim: int,
    *,
    collection: str = "ctl_products",
    api_key: str | None = None,
    https: bool | None = None,
    verify: bool | str | ssl.SSLContext | None = None,
    prefer_grpc: bool = False,
    timeout: float = 10,
    location: str | None = None,
    path: str | Path | None = None,
    shards: int | None = None,
    replication_factor: int | None = None,
) -> QdrantClientStore:
    """Open the store on collection `collection` of the Qdrant at `url`, creating the collection if missing.

    Exactly one of `url` (a server: "http://host:6333"), `location=":memory:"` or `path=` (qdrant-client's
    local mode, for tests) is given. `api_key`, `https` and `prefer_grpc` are qdrant-client's; `verify` is
    passed to httpx (False, or a CA bundle path) for self-signed TLS. `timeout` (seconds) bounds each
    request, so an unreachable server fails fast with StoreError naming the URL.
    `collection` may be an alias: the store works on the collection behind it (see `check()`).
    Raises VersionMismatch when the collection was made for another model version or dimension, and
    StoreLocked when a local-mode `path` is already open elsewhere. `shards` and `replication_factor`
    apply when the collection is created (a cluster: e.g. 6 shards, each on 2 of 3 nodes).
    """
    if sum(x is not None for x in (url, location, path)) != 1:
        raise ValueError(
            "give exactly one of url (a Qdrant server), location=':memory:' or path= (local mode)"
        )
    if location is not None and location != ":memory:":
        raise ValueError(
            f"location must be ':memory:' (use url= for a server, path= for a folder), not {location!r}"
        )
    check_model(model_version, embedding_dim)
    local = url is None
    where = (
        url if url is not None else ("local mode in memory" if path is None else f"local mode path {path}")
    )
    with _map_errors("connect", where):
        if local:
            client = AsyncQdrantClient(location=location, path=None if path is None else str(path))
        else:
            if isinstance(verify, str):
                verify = ssl.create_default_context(cafile=verify)  # httpx's way for a CA file
            extra: dict[str, Any] = {} if verify is None else {"verify": verify}
            # No background version probe: the collection lookup below already fails fast when unreachable.
            client = AsyncQdrantClient(
                url=url,
                api_key=api_key,
                https=https,
                prefer_grpc=prefer_grpc,
                timeout=math.ceil(timeout),  # qdrant-client takes whole seconds
                check_compatibility=False,
                **extra,
            )
    try:
        target = await _ensure_collection(
            client,
            collection,
            where,
            model_version,
            embedding_dim,
            local=local,
            shards=shards,
            replication_factor=replication_factor,
        )
    except BaseException:
        await client.close()
        raise
    return QdrantClientStore(
        client, target, where, model_version, embedding_dim, local=local, name=collection
    )
