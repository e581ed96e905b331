"""The ranking invariants over everything the API accepts (issue 14 #2, #5, #8), as property tests.

Random catalogs go in through the ranker's own acceptance path (`RankerServicer.upsert` with precomputed
embeddings, norms anywhere within the accepted 1e-3 of unit length, many exact duplicates under other ids),
into a real embedded Qdrant store, and come out through `RankerApp.recommend` (precomputed scene
embeddings, also near-unit). No gRPC here: the servers' own tests cover the transport; this covers the
arithmetic, hundreds of times. The reference is computed here in float64 from the normalised inputs.

Invariants:
- certify is always certified and its top K is the exact top K: every product strictly better than the
  K-th is in it, nothing in it is worse than the K-th (1e-5: float32), distances match exhaustive's;
- a pooled answer whose pool held every matching product is certified and equals exhaustive's;
- distances lie in [0, 4]; equal distances come ordered by product id, also across modes;
- `category_size` counts the products that match the filters and exclusions.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import AsyncIterator

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctl.encoding import ModelInfo
from ctl.serving import Metrics
from ctl.tensors import Scene, product_to_proto, scene_to_proto
from ctl.v1 import ranker_pb2
from ranker_service.app import RankerApp
from ranker_service.config import RankerConfig
from ranker_service.encoder_client import EncoderClient
from ranker_service.service import RankerServicer
from ranker_service.store.edge import open_edge_store
from style_model.distances import hybrid_distances

VERSION = "m-1"
CERTIFY = ranker_pb2.RETRIEVAL_MODE_CERTIFY
EXHAUSTIVE = ranker_pb2.RETRIEVAL_MODE_EXHAUSTIVE
POOLED = ranker_pb2.RETRIEVAL_MODE_POOLED
TOL = 1e-5


def _near_unit(rng: np.random.Generator, rows: np.ndarray, spread: float) -> np.ndarray:
    """Rows scaled to norms in [1 - spread, 1 + spread] (spread < 1e-3: all accepted)."""
    unit = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    scale = 1.0 + rng.uniform(-spread, spread, size=(*rows.shape[:-1], 1))
    return (unit * scale).astype(np.float32)


def _unit64(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


class _Catalog:
    """A random catalog and scene, and the exact float64 ranking of the normalised vectors."""

    def __init__(self, seed: int, n: int, distinct: int, dim: int, regions: int, spread: float, shape: str):
        rng = np.random.default_rng(seed)
        if shape == "clustered":
            centres = rng.standard_normal((3, dim))
            base = centres[rng.integers(0, 3, distinct)] + 0.2 * rng.standard_normal((distinct, dim))
        else:
            base = rng.standard_normal((distinct, dim))
        keys = rng.standard_normal((distinct, dim))
        pick = rng.integers(0, distinct, n)  # distinct < n: exact duplicates under other ids
        self.styles = _near_unit(rng, base[pick], spread)
        self.keys = _near_unit(rng, keys[pick], spread)
        self.ids = [f"p{i:04d}" for i in rng.permutation(n)]
        self.parity = ["even" if i % 2 == 0 else "odd" for i in range(n)]
        self.scene = Scene(
            _near_unit(rng, rng.standard_normal(dim), spread),
            _near_unit(rng, rng.standard_normal((regions, dim)), spread),
            _near_unit(rng, rng.standard_normal((regions, dim)), spread),
        )

    def reference(self, keep: np.ndarray) -> dict[str, float]:
        s = self.scene
        d = hybrid_distances(
            _unit64(s.global_),
            _unit64(s.local),
            _unit64(s.attention),
            _unit64(self.styles[keep]),
            _unit64(self.keys[keep]),
        ).hybrid
        return {self.ids[i]: float(x) for i, x in zip(np.flatnonzero(keep), d)}


async def _requests(catalog: _Catalog, category: str) -> AsyncIterator[ranker_pb2.UpsertProductsRequest]:
    for i, pid in enumerate(catalog.ids):
        yield ranker_pb2.UpsertProductsRequest(
            product=ranker_pb2.Product(
                product_id=pid,
                category=category,
                metadata={"parity": catalog.parity[i]},
                embedding=product_to_proto(catalog.styles[i], catalog.keys[i], VERSION),
            )
        )


def _check_order(result: ranker_pb2.CategoryRecommendations) -> None:
    distances = [p.distance for p in result.products]
    assert all(0.0 <= d <= 4.0 for d in distances), distances
    pairs = [(p.distance, p.product_id) for p in result.products]
    assert pairs == sorted(pairs), pairs  # by distance, equal ones by product id


def _check_top_k(got: list[str], reference: dict[str, float], k: int) -> None:
    """`got` is an exact top k of `reference` up to float32 rounding at the cut-off."""
    ranked = sorted(reference.values())
    kth = ranked[min(k, len(ranked)) - 1]
    assert len(got) == min(k, len(reference))
    assert len(set(got)) == len(got)
    must = {pid for pid, d in reference.items() if d < kth - TOL}
    assert must <= set(got), (sorted(must - set(got)), kth)
    worst = max(reference[pid] for pid in got)
    assert worst <= kth + TOL, (worst, kth)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 260),
    distinct_share=st.sampled_from([1.0, 0.5, 0.1, 0.02]),
    dim=st.sampled_from([8, 32]),
    regions=st.sampled_from([1, 4]),
    spread=st.sampled_from([0.0, 5e-4, 9.9e-4]),
    shape=st.sampled_from(["random", "clustered"]),
    limit=st.integers(1, 25),
    first_width=st.integers(0, 3),
    filtered=st.sampled_from(["none", "parity", "exclude"]),
)
def test_certify_is_the_exact_top_k_for_everything_the_api_accepts(
    seed, n, distinct_share, dim, regions, spread, shape, limit, first_width, filtered
):
    catalog = _Catalog(seed, n, max(1, int(n * distinct_share)), dim, regions, spread, shape)
    keep = np.ones(n, dtype=bool)
    request = ranker_pb2.RecommendRequest(
        scene_embedding=scene_to_proto(catalog.scene, VERSION), categories=["c"], limit=limit
    )
    if filtered == "parity":
        request.filters.add(key="parity", any_of=["odd"])
        keep &= np.array([p == "odd" for p in catalog.parity])
    elif filtered == "exclude":
        excluded = catalog.ids[: n // 3]
        request.exclude_product_ids.extend(excluded)
        keep &= np.array([pid not in set(excluded) for pid in catalog.ids])
    reference = catalog.reference(keep)

    async def scenario() -> dict[int, ranker_pb2.CategoryRecommendations]:
        with tempfile.TemporaryDirectory() as tmp:
            store = await open_edge_store(tmp, VERSION, dim)
            app = RankerApp(RankerConfig(), EncoderClient("127.0.0.1:9", 1.0, 1 << 20), Metrics("test"))
            info = ModelInfo(VERSION, 64, 1, regions, dim, "test", max_batch_images=32)
            await app.attach(info, store)
            try:
                reply = await RankerServicer(app).upsert(_requests(catalog, "c"), None)
                assert reply.upserted == n and not reply.failures, reply.failures[:3]
                results = {}
                for mode in (CERTIFY, EXHAUSTIVE, POOLED):
                    ask = ranker_pb2.RecommendRequest()
                    ask.CopyFrom(request)
                    ask.mode = mode
                    # certify: a small first width, so that it has to prove its answer in rounds
                    ask.pool_size = limit + first_width if mode == CERTIFY else min(10_000, max(limit, n))
                    (results[mode],) = (await RankerServicer(app).recommend(ask, None)).results
                return results
            finally:
                await app.close()
                await store.close()
                await app.encoder.close()

    results = asyncio.run(scenario())
    matching = int(keep.sum())
    for mode, result in results.items():
        assert result.category_size == matching, (mode, result.category_size, matching)
        assert result.certified, mode  # certify proves it; the others scored everything that matches
        _check_order(result)
        got = [p.product_id for p in result.products]
        if matching:
            _check_top_k(got, reference, limit)
            np.testing.assert_allclose(
                [p.distance for p in result.products], [reference[pid] for pid in got], atol=TOL
            )
        else:
            assert got == []
    # the same answer in every mode, ties included (equal distances ordered by product id)
    exhaustive = [p.product_id for p in results[EXHAUSTIVE].products]
    for mode in (CERTIFY, POOLED):
        got = [p.product_id for p in results[mode].products]
        near_ties = _near_tie_ids(reference, limit)
        assert [g for g in got if g not in near_ties] == [e for e in exhaustive if e not in near_ties]


def _near_tie_ids(reference: dict[str, float], k: int) -> set[str]:
    """Products whose distance lies within float32 rounding of another, different distance: where exact
    modes may legitimately order them differently (bitwise-equal ones are ordered by id everywhere)."""
    values = np.array(sorted(set(reference.values())))
    close = set()
    for a, b in itertools.pairwise(values):
        if b - a <= TOL:
            close.update((a, b))
    return {pid for pid, d in reference.items() if d in close}
