"""Conformance suite of the product store: every scenario runs against both adapters (DESIGN.md §2).

`edge`: the embedded qdrant-edge shard in tmp_path; `client`: qdrant-client's local mode on a tmp_path
folder (so that reopen and the folder lock are exercised too). Results are checked against numpy / Python
references, and random filters are replayed many times with the failing case printed, like qdrant-client's
congruence tests. Coroutines run with asyncio.run (no pytest-asyncio), one event loop per scenario.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ranker_service.errors import InvalidRequest, StoreClosed, StoreError, StoreLocked, VersionMismatch
from ranker_service.store import _points
from ranker_service.store.base import Condition, ProductPoint, ProductStore, Query, point_id
from ranker_service.store.client import QdrantClientStore, open_client_store
from ranker_service.store.edge import EdgeStore, open_edge_store

DIM = 16
VERSION = "m-test-1"
CATEGORIES = ("shoes", "bags", "tops", "pants", "hats")
COLORS = ("red", "blue", "black", "white")
BRANDS = ("acme", "globex", "initech")

REPO = Path(__file__).resolve().parents[1]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Each scenario in a fresh event loop (stores are opened and closed inside it)."""
    return asyncio.run(coro)


@dataclass(frozen=True)
class Backend:
    """How to open one adapter on a folder: the same call for every scenario."""

    name: str
    root: Path

    async def open(self, version: str = VERSION, embedding_dim: int = DIM, **kwargs: Any) -> ProductStore:
        if self.name == "edge":
            return await open_edge_store(self.root / "edge", version, embedding_dim, **kwargs)
        return await open_client_store(
            None, version, embedding_dim, path=self.root / "qdrant-local", **kwargs
        )


@pytest.fixture(params=["edge", "client"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return Backend(request.param, tmp_path)


def unit_rows(rng: np.random.Generator, n: int, embedding_dim: int = DIM) -> np.ndarray:
    rows = rng.standard_normal((n, embedding_dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def catalog(n: int = 500, seed: int = 0) -> list[ProductPoint]:
    """n products over 5 categories with unit vectors; `size` is missing on a third of them."""
    rng = np.random.default_rng(seed)
    styles, attention_keys = unit_rows(rng, n), unit_rows(rng, n)
    points = []
    for i in range(n):
        metadata = {"color": COLORS[rng.integers(len(COLORS))], "brand": BRANDS[rng.integers(len(BRANDS))]}
        if i % 3:
            metadata["size"] = str(rng.integers(3))
        points.append(
            ProductPoint(
                product_id=f"p{i:04d}",
                category=CATEGORIES[i % len(CATEGORIES)],
                style=styles[i],
                attention_key=attention_keys[i],
                metadata=metadata,
                model_version=VERSION,
            )
        )
    return points


def matches(point: ProductPoint, query: Query) -> bool:
    """The Python reference of a Query."""
    if point.category != query.category or point.product_id in query.exclude_ids:
        return False
    for c in query.conditions:
        value = point.metadata.get(c.key)
        if c.any_of and value not in c.any_of:
            return False
        if c.none_of and value in c.none_of:
            return False
    return True


def brute_force(points: Sequence[ProductPoint], vector: np.ndarray, query: Query, limit: int) -> list[str]:
    """The numpy reference of a search: product ids of the top `limit` dot products, best first."""
    kept = [p for p in points if matches(p, query)]
    if not kept:
        return []
    scores = np.stack([p.style for p in kept]) @ vector
    return [kept[i].product_id for i in np.argsort(-scores, kind="stable")[:limit]]


def assert_same_point(got: ProductPoint, want: ProductPoint) -> None:
    assert got.product_id == want.product_id
    assert got.category == want.category
    assert got.style.dtype == np.float32 and got.attention_key.dtype == np.float32
    assert np.array_equal(got.style, want.style)
    assert np.array_equal(got.attention_key, want.attention_key)
    assert dict(got.metadata) == dict(want.metadata)
    assert got.model_version == VERSION


async def loaded(backend: Backend, points: Sequence[ProductPoint], **kwargs: Any) -> ProductStore:
    store = await backend.open(**kwargs)
    await store.upsert(points)
    return store


def test_adapter_types(backend: Backend) -> None:
    async def scenario() -> None:
        store = await backend.open()
        assert isinstance(store, EdgeStore if backend.name == "edge" else QdrantClientStore)
        assert store.model_version == VERSION and store.embedding_dim == DIM and store.description
        await store.close()

    run(scenario())


def test_upsert_then_counts(backend: Backend) -> None:
    points = catalog()

    async def scenario() -> None:
        store = await loaded(backend, points)
        want = Counter(p.category for p in points)
        assert await store.count() == len(points)
        for category in CATEGORIES:
            assert await store.count(category) == want[category]
        assert await store.count("no-such-category") == 0
        assert await store.counts_by_category() == dict(want)
        await store.close()

    run(scenario())


def test_upsert_is_idempotent_and_replaces(backend: Backend) -> None:
    rng = np.random.default_rng(1)
    first = catalog(3)[0]
    moved = replace(
        first,
        category="bags",
        style=unit_rows(rng, 1)[0],
        attention_key=unit_rows(rng, 1)[0],
        metadata={"color": "green"},
    )

    async def scenario() -> None:
        store = await backend.open()
        await store.upsert([first])
        await store.upsert([first])
        assert await store.count() == 1
        await store.upsert([moved])
        assert await store.count() == 1
        assert await store.counts_by_category() == {"bags": 1}
        (got,) = await store.retrieve([first.product_id])
        assert_same_point(got, moved)
        await store.upsert([first, moved])  # listed twice in one batch: the last one wins
        (got,) = await store.retrieve([first.product_id])
        assert_same_point(got, moved)
        await store.close()

    assert point_id(first.product_id) == point_id(str(first.product_id))
    run(scenario())


def test_search_category_order_scores_and_round_trip(backend: Backend) -> None:
    points = catalog()
    by_id = {p.product_id: p for p in points}
    queries = unit_rows(np.random.default_rng(2), 3)

    async def scenario() -> None:
        store = await loaded(backend, points)
        for category in ("shoes", "hats"):
            lists = await store.search(queries, Query(category), 25)
            assert len(lists) == len(queries)
            for vector, hits in zip(queries, lists):
                assert len(hits) == 25
                assert all(p.category == category for p in hits.points)
                scores = hits.scores.tolist()
                assert scores == sorted(scores, reverse=True)
                assert hits.styles.shape == hits.attention_keys.shape == (25, DIM)
                assert hits.ids == [p.product_id for p in hits.points]
                for i, (score, point) in enumerate(zip(hits.scores, hits.points)):
                    want = by_id[point.product_id]
                    assert abs(score - float(want.style @ vector)) < 1e-5
                    assert_same_point(point, want)
                    assert np.array_equal(hits.styles[i], want.style)  # row i is points[i]'s vectors
                    assert np.array_equal(hits.attention_keys[i], want.attention_key)
        await store.close()

    run(scenario())


def test_exact_search_equals_numpy_top_k(backend: Backend) -> None:
    points = catalog()
    queries = unit_rows(np.random.default_rng(3), 8)

    async def scenario() -> None:
        store = await loaded(backend, points)
        for category in CATEGORIES:
            lists = await store.search(queries, Query(category), 10, exact=True)
            for vector, hits in zip(queries, lists):
                assert hits.ids == brute_force(points, vector, Query(category), 10)
        await store.close()

    run(scenario())


def test_batched_search_equals_single_rows(backend: Backend) -> None:
    points = catalog()
    queries = unit_rows(np.random.default_rng(4), 6)
    before = queries.copy()
    query = Query("tops", conditions=(Condition("color", none_of=("red",)),))

    async def scenario() -> None:
        store = await loaded(backend, points)
        batched = await store.search(queries, query, 15)
        assert len(batched) == len(queries)
        for row, hits in zip(queries, batched):
            (single,) = await store.search(row[None, :], query, 15)
            assert hits.ids == single.ids
            assert np.allclose(hits.scores, single.scores, atol=1e-6)
        assert await store.search(queries[:0], query, 15) == []
        await store.close()

    run(scenario())
    assert np.array_equal(queries, before)  # the caller's array is left alone


def random_query(rng: random.Random, points: Sequence[ProductPoint]) -> Query:
    """A random category, 0-2 conditions (any_of and/or none_of, possibly on a key some points lack), ids."""
    category = rng.choice(CATEGORIES)
    values = {"color": COLORS, "brand": BRANDS, "size": ("0", "1", "2"), "missing": ("x",)}
    conditions = []
    for key in rng.sample(sorted(values), rng.randint(0, 2)):
        domain = values[key]
        any_of = tuple(rng.sample(domain, rng.randint(1, len(domain)))) if rng.random() < 0.6 else ()
        none_of = tuple(rng.sample(domain, rng.randint(1, len(domain)))) if rng.random() < 0.5 else ()
        conditions.append(Condition(key, any_of=any_of, none_of=none_of))
    pool = [p.product_id for p in points if p.category == category]
    exclude = tuple(rng.sample(pool, rng.randint(0, 15))) if rng.random() < 0.5 else ()
    return Query(category, tuple(conditions), exclude)


def test_random_filters_match_reference(backend: Backend) -> None:
    points = catalog()
    rng = random.Random(5)
    vectors = unit_rows(np.random.default_rng(5), 100)

    async def scenario() -> None:
        store = await loaded(backend, points)
        for i, vector in enumerate(vectors):
            query = random_query(rng, points)
            (hits,) = await store.search(vector[None, :], query, 20, exact=True)
            got = hits.ids
            want = brute_force(points, vector, query, 20)
            if got != want:
                print(f"case {i} failed on {backend.name}: {query}\n got  {got}\n want {want}")
            assert got == want
            assert await store.count(query) == sum(matches(p, query) for p in points), query
            if i % 10 == 0:  # scroll with the same filter returns exactly the matching products
                page, offset = await store.scroll(query, len(points))
                assert offset is None
                assert sorted(p.product_id for p in page) == sorted(
                    p.product_id for p in points if matches(p, query)
                ), query
        await store.close()

    run(scenario())


def test_scroll_pages_cover_category_exactly_once(backend: Backend) -> None:
    points = catalog()
    query = Query("pants", conditions=(Condition("brand", any_of=("acme", "globex")),))

    async def scenario() -> None:
        store = await loaded(backend, points)
        for q in (Query("pants"), query):
            seen: list[str] = []
            offset: str | None = None
            pages = 0
            while True:
                page, offset = await store.scroll(q, 7, offset)
                assert len(page) <= 7
                assert all(matches(p, q) for p in page)
                seen += [p.product_id for p in page]
                pages += 1
                if offset is None:
                    break
                assert isinstance(offset, str)
            want = sorted(p.product_id for p in points if matches(p, q))
            assert len(seen) == len(set(seen))
            assert sorted(seen) == want
            assert pages >= len(want) // 7
        with pytest.raises(InvalidRequest):
            await store.scroll(query, 7, "not-an-offset")
        await store.close()

    run(scenario())


def test_retrieve_returns_only_existing_ids(backend: Backend) -> None:
    points = catalog(50)
    by_id = {p.product_id: p for p in points}
    asked = ["p0007", "nope", "p0003", "p0007", "p0049", "also-missing"]

    async def scenario() -> None:
        store = await loaded(backend, points)
        got = await store.retrieve(asked)
        assert [p.product_id for p in got] == ["p0007", "p0003", "p0049"]
        for p in got:
            assert_same_point(p, by_id[p.product_id])
        assert await store.retrieve([]) == []
        assert await store.retrieve(["nope"]) == []
        await store.close()

    run(scenario())


def test_lookup_lists_the_stored_products_without_vectors(backend: Backend) -> None:
    """What GetProducts answers: the products held among the ids asked (id, category, metadata), in the
    order asked, each once; what the store holds now (a replaced product's new listing, not a deleted one)."""
    points = catalog(50)
    by_id = {p.product_id: p for p in points}
    asked = ["p0007", "nope", "p0003", "p0007", "p0049", "also-missing"]

    async def scenario() -> None:
        store = await loaded(backend, points)
        got = await store.lookup(asked)
        assert [p.product_id for p in got] == ["p0007", "p0003", "p0049"]
        for p in got:
            want = by_id[p.product_id]
            assert (p.category, dict(p.metadata)) == (want.category, dict(want.metadata))
            assert not hasattr(p, "style")
        assert [p.product_id for p in got] == [p.product_id for p in await store.retrieve(asked)]
        assert await store.lookup([]) == [] and await store.lookup(["nope"]) == []
        await store.upsert([replace(by_id["p0003"], category="hats", metadata={"color": "green"})])
        await store.delete(["p0049"])
        (moved, first) = await store.lookup(["p0003", "p0007"])
        assert (moved.category, dict(moved.metadata)) == ("hats", {"color": "green"})
        assert first.product_id == "p0007"
        assert await store.lookup(["p0049"]) == []
        await store.close()
        with pytest.raises(StoreClosed):
            await store.lookup(["p0007"])

    run(scenario())


def test_delete_removes_and_ignores_unknown_ids(backend: Backend) -> None:
    points = catalog()
    gone = [p.product_id for p in points[:40]]
    kept = points[40:]

    async def scenario() -> None:
        store = await loaded(backend, points)
        await store.delete([*gone, "never-existed"])
        await store.delete(["never-existed"])
        await store.delete([])
        assert await store.count() == len(kept)
        assert await store.counts_by_category() == dict(Counter(p.category for p in kept))
        assert await store.retrieve(gone) == []
        vector = points[0].style  # the deleted product's own vector: it would be its best match
        (hits,) = await store.search(vector[None, :], Query(points[0].category), 50, exact=True)
        assert not set(hits.ids) & set(gone)
        assert hits.ids == brute_force(kept, vector, Query(points[0].category), 50)
        await store.close()

    run(scenario())


def test_reopen_keeps_data(backend: Backend) -> None:
    points = catalog(200)

    async def scenario() -> None:
        store = await loaded(backend, points)
        await store.delete(["p0000"])
        await store.close()
        store = await backend.open()
        assert await store.count() == len(points) - 1
        got = await store.retrieve([p.product_id for p in points])
        assert len(got) == len(points) - 1
        for p, want in zip(got, points[1:]):
            assert_same_point(p, want)
        await store.close()

    run(scenario())


def test_vectors_stored_off_unit_length_are_normalised_when_the_store_opens(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 #2, for catalogs stored before the ranker normalised what it accepts: vectors within 1e-3 of
    unit length were stored as given. Opening the store makes them unit vectors, in the engine too (its
    exact search scores are the dot products with the unit vectors); unit ones are left as they are. A
    Qdrant collection records that it was checked (its metadata), so that is done once, not at every start."""
    points = catalog(300)
    shrunk = [
        dataclasses.replace(p, style=p.style * 0.9991, attention_key=p.attention_key * 1.001)
        for p in points[:40]
    ]
    query = unit_rows(np.random.default_rng(9), 1)

    async def scenario() -> None:
        store = await backend.open()
        with monkeypatch.context() as old_version:  # how earlier versions wrote: vectors as given
            old_version.setattr(_points, "UNIT_STORED", float("inf"))
            await store.upsert(shrunk + points[40:])
        await store.close()
        if backend.name == "client":  # a collection made before the check existed: no record of it
            await _forget_unit_check(backend.root / "qdrant-local")
        store = await backend.open()
        for p, want in zip(await store.retrieve([p.product_id for p in points]), points):
            np.testing.assert_allclose(p.style, want.style, atol=1e-6)
            np.testing.assert_allclose(p.attention_key, want.attention_key, atol=1e-6)
            assert dict(p.metadata) == dict(want.metadata) and p.category == want.category
        for category in CATEGORIES:
            (hits,) = await store.search(query, Query(category), 60, exact=True)
            np.testing.assert_allclose(hits.scores, hits.styles @ query[0], atol=1e-6)
            np.testing.assert_allclose(np.linalg.norm(hits.styles, axis=1), 1.0, atol=1e-6)
        await store.close()

    run(scenario())


ODD_METADATA = [  # keys and values that a JSON path or a joined "key=value" keyword would confuse
    {'a"b': "x", "c\\d": "y"},
    {"k": 'v"],["j', "j": "w"},
    {"k": "v", "j": "w"},
    {"x.y": "1", "x": "2"},
    {"k=v": "z"},
    {},
]


def test_filters_match_keys_and_values_of_any_characters(backend: Backend) -> None:
    """Filters match metadata through one indexed digest per entry (`metadata_digests`, issue 20 #5: a
    condition on the unindexed metadata object cost ~1 µs per product of the category, and 1,000 of them
    froze the ranker for a minute). The digest is of JSON [key, value], so no key or value can pass for
    another; keys with quotes and backslashes, refused before, filter like any other."""
    points = [
        dataclasses.replace(p, metadata=ODD_METADATA[i % len(ODD_METADATA)], category="shoes")
        for i, p in enumerate(catalog(60))
    ]
    queries = [
        Query("shoes", (Condition('a"b', ("x",)),)),
        Query("shoes", (Condition("c\\d", (), ("y",)),)),
        Query("shoes", (Condition("k", ('v"],["j',)),)),
        Query("shoes", (Condition("k", ("v",)), Condition("j", ("w",)))),
        Query("shoes", (Condition("x.y", ("1",)),)),
        Query("shoes", (Condition("x", (), ("2",)),)),
        Query("shoes", (Condition("k=v", ("z",)),)),
        Query("shoes", (Condition("k", ("v=z",)),)),
    ]
    vector = unit_rows(np.random.default_rng(4), 1)

    async def scenario() -> None:
        store = await loaded(backend, points)
        for query in queries:
            (hits,) = await store.search(vector, query, 100, exact=True)
            assert hits.ids == brute_force(points, vector[0], query, 100), query
            assert await store.count(query) == sum(matches(p, query) for p in points), query
        await store.close()

    run(scenario())


def test_products_written_without_metadata_terms_get_them_when_the_store_opens(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Products written without `metadata_digests` (by a ranker older than them: a store made before, or
    an older replica writing to a shared collection during a rolling update, after a newer one opened it)
    get them at every open, so filters find them. Review of issue 20: a once-per-store flag missed what
    older code wrote after the store was first brought up to date."""
    points = catalog(300)
    vector = unit_rows(np.random.default_rng(8), 1)
    queries = [
        Query(c, (Condition("color", ("red", "blue")), Condition("brand", (), ("acme",)))) for c in CATEGORIES
    ]

    async def check(store: ProductStore, stored: Sequence[ProductPoint]) -> None:
        for query in queries:
            (hits,) = await store.search(vector, query, 100, exact=True)
            assert hits.ids == brute_force(stored, vector[0], query, 100), query

    async def scenario() -> None:
        store = await backend.open()
        with monkeypatch.context() as old_version:  # how earlier versions wrote: no terms at all
            old_version.setattr(_points, "stored_fields", _without_terms(_points.stored_fields))
            await store.upsert(points[:200])
        await store.close()
        store = await backend.open()  # brought up to date
        await check(store, points[:200])
        with monkeypatch.context() as old_version:  # an older replica writes after that
            old_version.setattr(_points, "stored_fields", _without_terms(_points.stored_fields))
            await store.upsert(points[200:])
        await store.close()
        store = await backend.open()
        await check(store, points)
        await store.close()

    run(scenario())


def _without_terms(stored_fields):
    def old(point, model_version, embedding_dim):
        vectors, payload = stored_fields(point, model_version, embedding_dim)
        payload.pop(_points.METADATA_TERMS)
        return vectors, payload

    return old


async def _forget_unit_check(path: Path) -> None:
    from qdrant_client import AsyncQdrantClient

    client = AsyncQdrantClient(path=str(path))
    try:
        (collection,) = (await client.get_collections()).collections
        metadata = dict((await client.get_collection(collection.name)).config.metadata or {})
        metadata.pop("unit_vectors", None)
        await client.update_collection(collection.name, metadata={**metadata, "unit_vectors": False})
    finally:
        await client.close()


def test_reopen_with_another_model_version_or_dim_is_refused(backend: Backend) -> None:
    async def scenario() -> None:
        store = await loaded(backend, catalog(10))
        await store.close()
        with pytest.raises(VersionMismatch, match=r"m-test-1.*m-test-2"):
            await backend.open(version="m-test-2")
        with pytest.raises(VersionMismatch, match="re-ingest"):
            await backend.open(embedding_dim=DIM * 2)
        store = await backend.open()  # the refused opens released everything
        assert await store.count() == 10
        await store.close()

    run(scenario())


def test_second_open_while_open_is_locked(backend: Backend) -> None:
    async def scenario() -> None:
        store = await loaded(backend, catalog(10))
        with pytest.raises(StoreLocked, match="already open"):
            await backend.open()
        assert await store.count() == 10  # the first one is unharmed
        await store.close()
        store = await backend.open()  # and the lock went with close()
        assert await store.count() == 10
        await store.close()

    run(scenario())


def test_closed_store_raises_store_closed(backend: Backend) -> None:
    points = catalog(10)

    async def scenario() -> None:
        store = await loaded(backend, points)
        await store.check()  # open: serves
        await store.close()
        await store.close()  # twice is fine
        calls = [
            store.check(),
            store.upsert(points),
            store.search(np.zeros((1, DIM), np.float32), Query("shoes"), 5),
            store.scroll(Query("shoes"), 5),
            store.retrieve(["p0001"]),
            store.delete(["p0001"]),
            store.count(),
            store.counts_by_category(),
            store.optimize(),
        ]
        for call in calls:
            with pytest.raises(StoreClosed):
                await call

    run(scenario())


def test_client_store_check_fails_when_its_collection_is_gone(tmp_path: Path) -> None:
    """Health probes call check(): a collection deleted under the ranker (by hand, by another tool) makes
    it fail, naming the collection, where the next Recommend would otherwise fail."""

    async def scenario() -> None:
        store = await open_client_store(None, VERSION, DIM, path=tmp_path / "q", collection="mine")
        await store.check()
        await store._live().delete_collection("mine")
        with pytest.raises(StoreError, match=r"collection 'mine' .* is gone"):
            await store.check()
        await store.close()

    run(scenario())


async def _point_alias(client: Any, alias: str, collection: str, *, move: bool = True) -> None:
    """Point `alias` at `collection` in one request, as an operator switches a catalog."""
    from qdrant_client import models as qm

    operations: list[Any] = (
        [qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias))] if move else []
    )
    operations.append(
        qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=collection, alias_name=alias))
    )
    await client.update_collection_aliases(change_aliases_operations=operations)


def _ids(hits: Any) -> set[str]:
    return set(hits[0].ids)


def test_client_store_on_an_alias_refuses_once_the_alias_points_at_another_model(tmp_path: Path) -> None:
    """Issue 14 item 4: `--collection` naming an alias that is moved later. The version was checked only at
    open and Qdrant resolved the alias on every call, so once it pointed at model B's collection this store
    read B's vectors and wrote A's into it, and check() passed. Now the store works on the collection the
    alias named when it was checked; check() (the ranker's probe) reads the collection behind the alias:
    another model's makes it raise VersionMismatch naming both, and every call refuses the same way (the
    ranker: NOT_SERVING, FAILED_PRECONDITION) until the alias points at a collection of this model again,
    which it then follows (the same model re-ingested into a new collection).

    Local mode allows one client per folder, so the alias is moved through the store's own client."""
    other = "m-test-2"
    path = tmp_path / "q"
    a, b, a2 = catalog(40, seed=1), catalog(40, seed=2), catalog(40, seed=3)
    b = [replace(p, product_id=f"b-{p.product_id}", model_version=other) for p in b]
    a2 = [replace(p, product_id=f"a2-{p.product_id}") for p in a2]
    probe = a[0].style[None]
    where = Query(a[0].category)

    async def scenario() -> None:
        for name, version, points in (
            ("products_a", VERSION, a),
            ("products_b", other, b),
            ("products_a2", VERSION, a2),
        ):
            made = await open_client_store(None, version, DIM, path=path, collection=name)
            await made.upsert(points)
            await made.close()
        store = await open_client_store(None, VERSION, DIM, path=path, collection="products_a")
        await _point_alias(store._live(), "products", "products_a", move=False)
        await store.close()

        store = await open_client_store(None, VERSION, DIM, path=path, collection="products")
        assert "products_a" in store.description and "'products'" in store.description
        client = store._live()
        await store.check()
        assert _ids(await store.search(probe, where, 100)) <= {p.product_id for p in a}

        await _point_alias(client, "products", "products_b")
        # until the probe runs, this store still reads and writes model A's collection, never B's
        assert _ids(await store.search(probe, where, 100)) <= {p.product_id for p in a}
        await store.upsert(a[:1])
        assert (await client.count("products_b")).count == len(b)
        with pytest.raises(
            VersionMismatch, match=r"'products_b' \(behind alias 'products'\).*'m-test-2', not 'm-test-1'"
        ):
            await store.check()
        for call in (
            store.search(probe, where, 10),
            store.upsert(a[:1]),
            store.count(),
            store.retrieve([a[0].product_id]),
        ):
            with pytest.raises(VersionMismatch, match="products_b"):
                await call
        assert (await client.count("products_b")).count == len(b)

        await _point_alias(client, "products", "products_a")  # moved back: serves again
        await store.check()
        assert await store.count() == len(a)

        await _point_alias(client, "products", "products_a2")  # the same model, re-ingested: followed
        await store.check()
        assert "products_a2" in store.description
        assert _ids(await store.search(probe, where, 100)) <= {p.product_id for p in a2}
        assert await store.count() == len(a2)
        await store.close()

    run(scenario())


def test_client_store_check_sees_its_collection_recreated_for_another_model(tmp_path: Path) -> None:
    """The same mistake without an alias: the collection deleted and made again under the same name by
    another model's ingestion. check() reads its metadata, not only whether it exists."""

    async def scenario() -> None:
        store = await open_client_store(None, VERSION, DIM, path=tmp_path / "q", collection="mine")
        await store.upsert(catalog(10))
        client = store._live()
        await client.delete_collection("mine")
        from qdrant_client import models as qm

        await client.create_collection(
            "mine",
            vectors_config={
                n: qm.VectorParams(size=DIM, distance=qm.Distance.DOT) for n in ("style", "attention")
            },
            metadata={"model_version": "m-test-2", "dim": DIM},
        )
        with pytest.raises(VersionMismatch, match=r"'mine'.*'m-test-2'.*'m-test-1'"):
            await store.check()
        with pytest.raises(VersionMismatch):
            await store.count()
        await store.close()

    run(scenario())


def test_bad_inputs_are_refused(backend: Backend) -> None:
    point = catalog(1)[0]

    async def scenario() -> None:
        store = await backend.open()
        with pytest.raises(InvalidRequest):
            await store.upsert([replace(point, style=np.zeros(DIM + 1, np.float32))])
        with pytest.raises(InvalidRequest):
            await store.upsert([replace(point, attention_key=np.full(DIM, np.nan, np.float32))])
        with pytest.raises(InvalidRequest, match="zero vector"):
            await store.upsert([replace(point, style=np.zeros(DIM, np.float32))])
        await store.upsert([replace(point, product_id="long", style=point.style * 3)])  # stored unit length
        (long,) = await store.retrieve(["long"])
        np.testing.assert_allclose(long.style, point.style, atol=1e-6)
        await store.delete(["long"])
        with pytest.raises(VersionMismatch):
            await store.upsert([replace(point, model_version="m-other")])
        await store.upsert([replace(point, model_version="")])  # unversioned points take the store's
        (got,) = await store.retrieve([point.product_id])
        assert got.model_version == VERSION
        with pytest.raises(InvalidRequest):
            await store.search(np.zeros((2, DIM + 1), np.float32), Query("shoes"), 5)
        with pytest.raises(InvalidRequest):
            await store.search(np.zeros(DIM, np.float32), Query("shoes"), 5)
        await store.close()

    run(scenario())


def test_optimize_then_search_is_still_right(backend: Backend) -> None:
    points = catalog()
    queries = unit_rows(np.random.default_rng(6), 8)
    kwargs = {"indexing_threshold_kb": 1} if backend.name == "edge" else {}  # so HNSW is really built

    async def scenario() -> None:
        store = await loaded(backend, points, **kwargs)
        await store.optimize()
        await store.upsert(catalog(520)[500:])  # writes after optimize land in a fresh segment
        everything = catalog(520)
        assert await store.counts_by_category() == dict(Counter(p.category for p in everything))
        for category in ("shoes", "bags"):
            exact = await store.search(queries, Query(category), 10, exact=True)
            approx = await store.search(queries, Query(category), 10)
            for vector, hits, ann in zip(queries, exact, approx):
                want = brute_force(everything, vector, Query(category), 10)
                assert hits.ids == want
                assert len(set(ann.ids) & set(want)) >= 9  # HNSW recall@10
        await store.close()

    run(scenario())


def test_edge_store_refuses_a_foreign_shard(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await open_edge_store(tmp_path / "s", VERSION, DIM)
        await store.close()
        (tmp_path / "s" / "ctl_store.json").unlink()
        with pytest.raises(VersionMismatch, match="model version is unknown"):
            await open_edge_store(tmp_path / "s", VERSION, DIM)

    run(scenario())


LOCK_PROBE = """
import asyncio, sys
from ranker_service.errors import StoreLocked
from ranker_service.store.edge import open_edge_store
try:
    asyncio.run(open_edge_store(sys.argv[1], sys.argv[2], int(sys.argv[3])))
except StoreLocked as exc:
    print("locked:", exc)
else:
    print("opened")
"""


def test_edge_store_is_locked_against_another_process(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await open_edge_store(tmp_path / "s", VERSION, DIM)
        probe = [sys.executable, "-c", LOCK_PROBE, str(tmp_path / "s"), VERSION, str(DIM)]
        out = subprocess.run(probe, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.stdout.startswith("locked: "), out.stdout + out.stderr
        assert "already open in another process" in out.stdout
        await store.close()

    run(scenario())


def test_client_store_unreachable_server_fails_fast() -> None:
    url = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once

    async def scenario() -> None:
        with pytest.raises(StoreError, match=re.escape(url)):  # an error naming the URL, not a hang
            await asyncio.wait_for(open_client_store(url, VERSION, DIM, timeout=2), 120)

    run(scenario())


def test_client_store_rejects_conflicting_locations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        run(open_client_store("http://localhost:6333", VERSION, DIM, location=":memory:"))
    with pytest.raises(ValueError, match="exactly one"):
        run(open_client_store(None, VERSION, DIM))


def test_client_store_in_memory() -> None:
    points = catalog(50)

    async def scenario() -> None:
        store = await open_client_store(None, VERSION, DIM, location=":memory:")
        await store.upsert(points)
        assert await store.count() == 50
        assert "memory" in store.description
        await store.close()

    run(scenario())


def test_client_store_following_a_moved_alias_normalises_a_collection_made_before(tmp_path: Path) -> None:
    """Review of issue 14: an alias switched (blue/green) to a collection made by an older ctl (vectors as
    given, no `unit_vectors` mark) was followed as it was, so certify ran on non-unit vectors until a
    restart. Following it normalises it first, as opening does."""
    from qdrant_client import models as qm

    async def scenario() -> None:
        store = await open_client_store(None, VERSION, DIM, collection="blue", path=tmp_path / "q")
        client = store._client  # the same local-mode folder can be opened by one client only
        params = qm.VectorParams(size=DIM, distance=qm.Distance.DOT)
        await client.create_collection(
            "green",
            vectors_config={"style": params, "attention": params},
            metadata={"model_version": VERSION, "dim": DIM},
        )
        off = (unit_rows(np.random.default_rng(3), 1)[0] * 1.0009).tolist()
        payload = {"product_id": "g1", "category": "shoes", "metadata": {}, "model_version": VERSION}
        point = qm.PointStruct(id=point_id("g1"), vector={"style": off, "attention": off}, payload=payload)
        await client.upsert("green", [point], wait=True)
        alias = qm.CreateAliasOperation(
            create_alias=qm.CreateAlias(collection_name="blue", alias_name="live")
        )
        await client.update_collection_aliases(change_aliases_operations=[alias])
        await store.close()

        store = await open_client_store(None, VERSION, DIM, collection="live", path=tmp_path / "q")
        moved = qm.CreateAliasOperation(
            create_alias=qm.CreateAlias(collection_name="green", alias_name="live")
        )
        await store._client.update_collection_aliases(
            change_aliases_operations=[
                qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name="live")),
                moved,
            ]
        )
        await store.check()
        (got,) = await store.retrieve(["g1"])
        np.testing.assert_allclose(np.linalg.norm(got.style), 1.0, atol=1e-6)
        await store.close()

    run(scenario())
