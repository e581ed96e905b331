"""Recommend for one category: candidates from the store, exact hybrid rerank, optional certificate.

Three modes (DESIGN.md §2):
- pooled: one filtered query with the attention-pooled scene vector, `pool` candidates, exact rerank. The
  query is exact (the store scans the category) when the category has at most `exact_below` products, and
  uses the store's HNSW index above: HNSW's recall depends on the data (docs/BENCHMARKS.md), a scan of
  100k products costs ~20 ms;
- exhaustive: every product of the category (that passes the filters) scored exactly;
- certify: the pooled query plus the R bound queries f_s + f_i, all exact and in one batch call; the
  bound queries' limit doubles until the K-th best exact distance beats every unscored product.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from numpy.typing import NDArray

from ctl.tensors import Scene
from ranker_service.errors import UnknownCategory
from ranker_service.rerank import Ranked, bound_queries, certified, pooled_query, rank
from ranker_service.store import ProductPoint, ProductStore, Query

log = logging.getLogger(__name__)

SCROLL_PAGE = 2048
MEAN_KEY_SAMPLE = 2048


class Mode(Enum):
    POOLED = "pooled"
    EXHAUSTIVE = "exhaustive"
    CERTIFY = "certify"


@dataclass(frozen=True)
class Ask:
    """What to rank for one category."""

    query: Query
    limit: int
    mode: Mode = Mode.POOLED
    pool: int = 0  # 0: max(100, 20 × limit)


@dataclass
class Result:
    """The ranked products of one category and how they were found."""

    category: str
    products: list[ProductPoint]
    ranked: Ranked
    candidates_scored: int
    category_size: int
    certified: bool
    mode: Mode
    rounds: int = 1


@dataclass
class _MeanKey:
    key: NDArray[np.float32] | None
    at: float


@dataclass
class Retriever:
    """Ranks a store's products for scenes. Keeps each category's mean attention key (a sample's mean,
    refreshed after `mean_key_ttl_s` or when this process changes the category)."""

    store: ProductStore
    mean_key_ttl_s: float = 300.0
    max_pool: int = 10_000
    exact_below: int = 200_000  # categories up to this size get exact candidate queries
    _mean_keys: dict[str, _MeanKey] = field(default_factory=dict)

    def forget(self, categories) -> None:
        """Products of these categories changed: recompute their mean keys on next use."""
        for c in categories:
            self._mean_keys.pop(c, None)

    async def mean_key(self, category: str) -> NDArray[np.float32] | None:
        cached = self._mean_keys.get(category)
        if cached is not None and time.monotonic() - cached.at < self.mean_key_ttl_s:
            return cached.key
        points, _ = await self.store.scroll(Query(category), MEAN_KEY_SAMPLE)
        key = np.mean([p.attention for p in points], axis=0).astype(np.float32) if points else None
        self._mean_keys[category] = _MeanKey(key, time.monotonic())
        return key

    async def recommend(self, scene: Scene, ask: Ask) -> Result:
        category = ask.query.category
        size = await self.store.count(category)
        if size == 0:
            known = sorted(await self.store.counts_by_category())
            shown = ", ".join(known[:20]) + (" …" if len(known) > 20 else "")
            raise UnknownCategory(f"no products in category {category!r}; the catalog has: {shown or 'none'}")
        if ask.mode is Mode.EXHAUSTIVE:
            return await self._exhaustive(scene, ask, size)
        if ask.mode is Mode.CERTIFY:
            return await self._certify(scene, ask, size)
        pool = min(ask.pool or max(100, 20 * ask.limit), self.max_pool)
        q = pooled_query(scene, await self.mean_key(category))
        (hits,) = await self.store.search(q[None, :], ask.query, pool, exact=size <= self.exact_below)
        points = [h.point for h in hits]
        # the whole category came back: nothing was left unscored
        return _result(scene, ask, points, size, certified=len(points) == size, rounds=1)

    async def _exhaustive(self, scene: Scene, ask: Ask, size: int) -> Result:
        points: list[ProductPoint] = []
        offset = None
        while True:
            page, offset = await self.store.scroll(ask.query, SCROLL_PAGE, offset)
            points.extend(page)
            if offset is None:
                break
        return _result(scene, ask, points, size, certified=True, rounds=1)

    async def _certify(self, scene: Scene, ask: Ask, size: int) -> Result:
        q = pooled_query(scene, await self.mean_key(ask.query.category))
        bounds_q = bound_queries(scene)
        width = min(ask.pool or max(100, 20 * ask.limit), self.max_pool)
        vectors = np.concatenate([q[None, :], bounds_q])
        seen: dict[str, ProductPoint] = {}
        rounds = 0
        while True:
            rounds += 1
            lists = await self.store.search(vectors, ask.query, width, exact=True)
            for hits in lists:
                for h in hits:
                    seen.setdefault(h.point.product_id, h.point)
            # each bound query's last score bounds every product it did not return (-inf: it returned all)
            bound_lists = lists[1:] if rounds == 1 else lists
            bounds = np.array([h[-1].score if len(h) >= width else -np.inf for h in bound_lists])
            result = _result(scene, ask, list(seen.values()), size, certified=False, rounds=rounds)
            everything = bool(np.all(np.isinf(bounds)))
            enough = len(result.products) >= ask.limit
            if everything or (enough and certified(float(result.ranked.distance[-1]), bounds)):
                result.certified = True
                return result
            vectors, width = bounds_q, width * 2


def _result(
    scene: Scene, ask: Ask, points: list[ProductPoint], size: int, *, certified: bool, rounds: int
) -> Result:
    """Exact rerank of the candidates; keeps the best `ask.limit`."""
    if points:
        styles = np.stack([p.style for p in points])
        keys = np.stack([p.attention for p in points])
    else:
        styles = keys = np.zeros((0, scene.global_.shape[0]), dtype=np.float32)
    ranked = rank(scene, styles, keys, ask.limit)
    return Result(
        category=ask.query.category,
        products=[points[i] for i in ranked.order],
        ranked=ranked,
        candidates_scored=len(points),
        category_size=size,
        certified=certified,
        mode=ask.mode,
        rounds=rounds,
    )
