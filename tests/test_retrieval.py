"""The pooled mode's candidate query: exact (a scan of the category) up to `exact_below` products, HNSW above;
and the category mean attention key it is built with, recomputed off the request path.

A real embedded store (qdrant-edge) with an HNSW index actually built and used: 12,000 random 256-d products
(12 MB of vectors, above the engine's 10 MB full-scan threshold, so the engine's planner does not scan by
itself). Random high-dimensional vectors are hard for HNSW, so its candidates differ from the exact ones;
that is what makes the exact path's equality meaningful.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from ctl.tensors import Scene
from ranker_service.rerank import pooled_query
from ranker_service.retrieval import Ask, Retriever
from ranker_service.retrieval_mode import RetrievalMode
from ranker_service.store.base import ProductPoint, Query
from ranker_service.store.edge import open_edge_store

DIM, REGIONS, N, POOL = 256, 4, 12_000, 200


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def test_pooled_candidates_are_exact_below_the_threshold_and_from_hnsw_above(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    styles, keys = _unit(rng.standard_normal((N, DIM))), _unit(rng.standard_normal((N, DIM)))
    ids = [f"p{i:05d}" for i in range(N)]
    scenes = [
        Scene(
            _unit(rng.standard_normal(DIM)),
            _unit(rng.standard_normal((REGIONS, DIM))),
            _unit(rng.standard_normal((REGIONS, DIM))),
        )
        for _ in range(5)
    ]

    async def scenario() -> None:
        store = await open_edge_store(tmp_path / "store", "m-1", DIM, indexing_threshold_kb=1)
        for start in range(0, N, 2000):
            await store.upsert(
                [
                    ProductPoint(ids[i], "shoes", styles[i], keys[i], {}, "m-1")
                    for i in range(start, start + 2000)
                ]
            )
        await store.optimize()  # builds HNSW for `style`
        exact, indexed = Retriever(store, exact_below=N), Retriever(store, exact_below=N - 1)
        mean_key = await exact.mean_attention_key("shoes")
        misses = 0
        for scene in scenes:
            scores = styles @ pooled_query(scene, mean_key)
            want = {ids[i] for i in np.argpartition(-scores, POOL)[:POOL]}
            ask = Ask(
                Query("shoes"), limit=POOL, mode=RetrievalMode.POOLED, pool=POOL
            )  # limit = pool: every candidate
            got = await exact.recommend(scene, ask)
            assert {p.product_id for p in got.products} == want
            assert got.candidates_scored == POOL and not got.certified
            approx = await indexed.recommend(scene, ask)
            assert len(approx.products) == POOL
            misses += len(want - {p.product_id for p in approx.products})
        assert misses > 0, "HNSW found every exact candidate: the index was not used, the test shows nothing"
        await store.close()

    asyncio.run(scenario())


def test_mean_keys_are_recomputed_in_the_background_after_a_change(tmp_path: Path) -> None:
    """A category's first query waits for its mean key (concurrent ones share one computation); after
    products change, queries go on with the old key at once while it is recomputed, then get the new one;
    a change during a computation leaves the result stale, so it is recomputed again; `warm()` computes
    every category's key ahead of its first query; changes recompute a key at most every 2 s."""
    rng = np.random.default_rng(5)

    def products(start: int, n: int, keys: np.ndarray) -> list[ProductPoint]:
        styles = _unit(rng.standard_normal((n, 8)))
        return [ProductPoint(f"p{start + i}", "shoes", styles[i], keys[i], {}, "m-1") for i in range(n)]

    first_keys = _unit(rng.standard_normal((50, 8)))
    later_keys = _unit(rng.standard_normal((50, 8)) + 3.0)  # another mean

    async def scenario() -> None:
        store = await open_edge_store(tmp_path / "store", "m-1", 8)
        await store.upsert(products(0, 50, first_keys))
        retriever = Retriever(store, changed_key_after_s=0)
        reads = 0
        scroll = store.scroll

        async def counted_scroll(*args, **kwargs):  # counts the store's reads; the store itself is real
            nonlocal reads
            reads += 1
            await asyncio.sleep(0)  # yields like a store across the network (qdrant-edge's read does not)
            return await scroll(*args, **kwargs)

        store.scroll = counted_scroll
        keys = await asyncio.gather(*(retriever.mean_attention_key("shoes") for _ in range(8)))
        assert reads == 1
        old = first_keys.mean(axis=0)
        for key in keys:
            np.testing.assert_allclose(key, old, atol=1e-6)

        await store.upsert(products(50, 50, later_keys))
        retriever.forget({"shoes"})
        np.testing.assert_allclose(await retriever.mean_attention_key("shoes"), old, atol=1e-6)  # no wait
        await asyncio.gather(*retriever._refreshing.values())
        new = np.concatenate([first_keys, later_keys]).mean(axis=0)
        np.testing.assert_allclose(await retriever.mean_attention_key("shoes"), new, atol=1e-6)
        assert reads == 2

        retriever.forget({"shoes"})
        await retriever.mean_attention_key("shoes")  # starts a recomputation...
        await asyncio.sleep(0)  # ...which begins reading...
        retriever.forget({"shoes"})  # ...and the category changes during it
        await asyncio.gather(*retriever._refreshing.values())
        await retriever.mean_attention_key("shoes")
        await asyncio.gather(*retriever._refreshing.values())
        assert reads == 4  # the result of the overtaken computation was not taken as fresh
        await retriever.close()

        warmed = Retriever(store)  # a ranker that starts computes every category's key in the background
        await warmed.warm()
        await asyncio.gather(*warmed._refreshing.values())
        assert reads == 5
        np.testing.assert_allclose(await warmed.mean_attention_key("shoes"), new, atol=1e-6)
        warmed.forget({"shoes"})  # changed again at once: not recomputed before changed_key_after_s (2 s)
        await warmed.mean_attention_key("shoes")
        assert reads == 5 and not warmed._refreshing
        await store.close()

    asyncio.run(scenario())
