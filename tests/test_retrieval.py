"""The pooled mode's candidate query: exact (a scan of the category) up to `exact_below` products, HNSW above.

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
from ranker_service.retrieval import Ask, Mode, Retriever
from ranker_service.store import ProductPoint, Query, open_edge_store

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
        mean_key = await exact.mean_key("shoes")
        misses = 0
        for scene in scenes:
            scores = styles @ pooled_query(scene, mean_key)
            want = {ids[i] for i in np.argpartition(-scores, POOL)[:POOL]}
            ask = Ask(
                Query("shoes"), limit=POOL, mode=Mode.POOLED, pool=POOL
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
