"""Recommend for one category: candidates from the store, exact hybrid rerank, optional certificate.

Three modes (DESIGN.md §2):
- pooled: one filtered query with the attention-pooled scene vector, `pool` candidates, exact rerank. The
  query is exact (the store scans the category) when the category has at most `exact_below` products, and
  uses the store's HNSW index above: HNSW's recall depends on the data, and what a scan costs is measured
  in docs/BENCHMARKS.md;
- exhaustive: every product of the category (that passes the filters) scored exactly;
- certify: the pooled query plus the R bound queries f_s + f_i, all exact, batched in calls of at most
  HITS_PER_CALL hits; the bound queries' limit doubles until the K-th best exact distance beats every
  unscored product, up to `max_certify_width` (4,096; at most `max_pool`): a category that does not
  certify by then (near-identical products) is answered with the best found, `certified=false`.

Before each store call the event loop gets a turn and the caller's deadline is checked (`_step`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ctl.tensors import Scene
from ranker_service.errors import DeadlineExceeded, UnknownCategory
from ranker_service.rerank import Ranked, bound_queries, certified, pooled_query, rank
from ranker_service.retrieval_mode import RetrievalMode
from ranker_service.store.base import Hits, ProductPoint, ProductStore, Query

log = logging.getLogger(__name__)

SCROLL_PAGE = 2048
DEFAULT_LIMIT = 10  # products per category when the caller does not say
HITS_PER_CALL = 8192  # certify's queries per store call: at most this many hits (vectors copied) a call
MEAN_KEY_SAMPLE = 2048


@dataclass(frozen=True)
class Ask:
    """What to rank for one category. A new ranking option is a field here (and its effect in this module):
    the app passes Asks through as they are."""

    query: Query
    limit: int = DEFAULT_LIMIT
    mode: RetrievalMode = RetrievalMode.POOLED
    pool: int = 0  # 0: max(100, 20 × limit)
    deadline: float | None = None  # time.monotonic() after which the caller has given up
    max_distance: float = 0.0  # products farther than this (exact hybrid distance) are left out; 0: none


@dataclass(frozen=True)
class SceneQuery:
    """One Recommend call: a scene, and one Ask per category (in the order answered). The scene is an
    encoded image (the ranker has it encoded) or embeddings of the serving model, unit length."""

    scene: bytes | Scene
    asks: tuple[Ask, ...]


async def _step(ask: Ask) -> None:
    """Before each store call: let the event loop run (engine calls hold the GIL, so health checks,
    other calls and shutdown get their turn only between them), and stop once the caller's deadline
    has passed instead of working for nobody."""
    await asyncio.sleep(0)
    if ask.deadline is not None and time.monotonic() > ask.deadline:
        raise DeadlineExceeded(
            f"the call's deadline passed while category {ask.query.category!r} was ranked; "
            "give the call more time, fewer categories or filters"
        )


@dataclass
class Result:
    """The ranked products of one category and how they were found."""

    category: str
    products: list[ProductPoint]
    ranked: Ranked
    candidates_scored: int
    category_size: int
    certified: bool
    mode: RetrievalMode
    rounds: int = 1


@dataclass
class Recommendations:
    """A Recommend call's answer: one Result per Ask, in order, and the model that ranked them."""

    results: list[Result]
    model_version: str
    grid: int  # the scene's region grid (attention weights are grid × grid)


@dataclass
class _MeanKey:
    attention_key: NDArray[np.float32] | None
    at: float  # monotonic time it was computed
    changed: bool = False  # products of the category changed since (or while) it was computed


@dataclass
class Retriever:
    """Ranks a store's products for scenes. Keeps each category's mean attention key (the mean over a
    sample of its products) for the pooled query; a key older than `mean_key_ttl_s`, or of a category this
    process changed (at most every `changed_key_after_s`: a stream of upserts would otherwise keep the
    event loop busy reading samples), is still used while a background task recomputes it, so that only a
    category's first query waits for the sample (none after `warm()`)."""

    store: ProductStore
    mean_key_ttl_s: float = 300.0
    changed_key_after_s: float = 2.0  # a changed category's key is recomputed at most this often
    max_pool: int = 10_000
    exact_below: int = 200_000  # categories up to this size get exact candidate queries
    max_certify_width: int = 4096  # certify's bound queries stop doubling here (unless the pool is larger)
    _mean_keys: dict[str, _MeanKey] = field(default_factory=dict)
    _refreshing: dict[str, asyncio.Task[NDArray[np.float32] | None]] = field(default_factory=dict)
    _changes: dict[str, int] = field(default_factory=dict)  # per category: forget() calls so far

    def forget(self, categories: Iterable[str]) -> None:
        """Products of these categories changed: their mean attention keys are recomputed on next use."""
        for c in categories:
            self._changes[c] = self._changes.get(c, 0) + 1
            if (cached := self._mean_keys.get(c)) is not None:
                cached.changed = True

    async def mean_attention_key(self, category: str) -> NDArray[np.float32] | None:
        cached = self._mean_keys.get(category)
        if cached is None or cached.attention_key is None:  # never computed, or the category was empty then
            return await asyncio.shield(self._refresh(category))  # one computation for concurrent callers
        age = time.monotonic() - cached.at
        if age >= self.mean_key_ttl_s or (cached.changed and age >= self.changed_key_after_s):
            self._refresh(category)
        return cached.attention_key

    async def warm(self) -> None:
        """Compute every category's mean key in the background (at start-up), so that first queries do
        not wait for them either."""
        for category in await self.store.counts_by_category():
            self._refresh(category)

    def _refresh(self, category: str) -> asyncio.Task[NDArray[np.float32] | None]:
        """The running recomputation of a category's mean key, started if there is none."""
        task = self._refreshing.get(category)
        if task is None or task.done():  # (a done task's callback may not have run yet)
            task = asyncio.create_task(self._compute_mean_key(category))
            self._refreshing[category] = task
            task.add_done_callback(lambda t: self._refreshed(category, t))
        return task

    def _refreshed(self, category: str, task: asyncio.Task[NDArray[np.float32] | None]) -> None:
        if self._refreshing.get(category) is task:
            del self._refreshing[category]
        if not task.cancelled() and task.exception() is not None:  # the old key stays in use
            log.warning("mean attention key of %r not refreshed: %s", category, task.exception())

    async def _compute_mean_key(self, category: str) -> NDArray[np.float32] | None:
        changes = self._changes.get(category, 0)
        points, _ = await self.store.scroll(Query(category), MEAN_KEY_SAMPLE)
        mean = np.mean([p.attention_key for p in points], axis=0).astype(np.float32) if points else None
        # changed while the sample was read: keep the key, but as changed (recomputed again)
        self._mean_keys[category] = _MeanKey(
            mean, time.monotonic(), self._changes.get(category, 0) != changes
        )
        return mean

    async def close(self) -> None:
        """Stop the background recomputations (before the store closes)."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def recommend(self, scene: Scene, ask: Ask) -> Result:
        """The best `ask.limit` products of the category by exact hybrid distance, found as `ask.mode`
        says, less those farther than `ask.max_distance` (cut once the answer is found and certified)."""
        return _within(await self._ranked(scene, ask), ask.max_distance)

    async def _ranked(self, scene: Scene, ask: Ask) -> Result:
        category = ask.query.category
        await _step(ask)
        size = await self.store.count(category)
        if size == 0:
            known = sorted(await self.store.counts_by_category())
            shown = ", ".join(known[:20]) + (" …" if len(known) > 20 else "")
            raise UnknownCategory(f"no products in category {category!r}; the catalog has: {shown or 'none'}")
        if ask.mode is RetrievalMode.EXHAUSTIVE:
            return await self._exhaustive(scene, ask)
        if ask.mode is RetrievalMode.CERTIFY:
            return await self._certify(scene, ask, size)
        pool = min(ask.pool or max(100, 20 * ask.limit), self.max_pool)
        q = pooled_query(scene, await self.mean_attention_key(category))
        scan = size <= self.exact_below
        await _step(ask)
        (hits,) = await self.store.search(q[None, :], ask.query, pool, exact=scan)
        # nothing that matches was left unscored (a scan that returned less than the pool returned all; an
        # HNSW search may return less than it was asked for, so only the whole category counts there)
        everything = len(hits) >= size or (scan and len(hits) < pool)
        if everything:
            size = len(hits)  # exact: what the filters leave (the whole category without filters)
        elif ask.query.conditions:  # an estimate (an exact count of a filter scans the category)
            await _step(ask)
            size = max(len(hits), min(size, await self.store.count(ask.query, exact=False)))
        elif ask.query.exclude_ids:  # at least the category less the exclusions (some may be elsewhere)
            size = max(len(hits), size - len(set(ask.query.exclude_ids)))
        return _result(
            scene, ask, hits.ids, hits.points, hits.styles, hits.attention_keys, size, everything, 1
        )

    async def _exhaustive(self, scene: Scene, ask: Ask) -> Result:
        points: list[ProductPoint] = []
        offset = None
        while True:
            await _step(ask)
            page, offset = await self.store.scroll(ask.query, SCROLL_PAGE, offset)
            points.extend(page)
            if offset is None:
                break
        styles = np.stack([p.style for p in points]) if points else _empty(scene)
        attention_keys = np.stack([p.attention_key for p in points]) if points else _empty(scene)
        ids = [p.product_id for p in points]
        return _result(scene, ask, ids, points, styles, attention_keys, len(points), certified=True, rounds=1)

    async def _certify(self, scene: Scene, ask: Ask, size: int) -> Result:
        q = pooled_query(scene, await self.mean_attention_key(ask.query.category))
        bounds_q = bound_queries(scene)
        width = first = min(ask.pool or max(100, 20 * ask.limit), self.max_pool)
        vectors = np.concatenate([q[None, :], bounds_q])
        seen = _Seen()
        rounds = 0
        while True:
            rounds += 1
            lists = []
            step = max(1, HITS_PER_CALL // width)  # wide rounds in several calls, the loop's turn between
            for start in range(0, len(vectors), step):
                await _step(ask)
                lists += await self.store.search(vectors[start : start + step], ask.query, width, exact=True)
            for hits in lists:
                seen.add(hits)
            # each bound query's last score bounds every product it did not return (-inf: it returned all)
            bound_lists = lists[1:] if rounds == 1 else lists
            bounds = np.array([h.scores[-1] if len(h) >= width else -np.inf for h in bound_lists])
            result = _result(scene, ask, *seen.candidates(scene), size, certified=False, rounds=rounds)
            everything = bool(np.all(np.isinf(bounds)))
            enough = len(result.products) >= ask.limit
            if everything or (enough and certified(float(result.ranked.distance[-1]), bounds)):
                result.certified = True
                if everything:  # every product that matches was returned and scored
                    result.category_size = result.candidates_scored
                elif _filtered(ask):  # exact, as a certified answer's size is (it scans the category)
                    await _step(ask)
                    result.category_size = await self.store.count(ask.query)
                return result
            cap = max(first, min(self.max_pool, self.max_certify_width))
            if width >= cap:
                # the work cap: a category of near-identical products never certifies short of scoring
                # all of it (R bound queries of the whole category at once: 100k products, 20 s, 3.7 GB);
                # the best found so far, not certified
                return result
            vectors, width = bounds_q, min(width * 2, cap)


class _Seen:
    """The distinct products that certify's queries returned so far: their vectors stacked, and where each
    one's ProductPoint comes from (made only for the products kept)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.order: list[str] = []  # the ids in the order they were first seen (row order)
        self.sources: list[tuple[Sequence[ProductPoint], int]] = []
        self.styles: list[NDArray[np.float32]] = []
        self.attention_keys: list[NDArray[np.float32]] = []

    def add(self, hits: Hits) -> None:
        new = [i for i, product_id in enumerate(hits.ids) if product_id not in self.ids]
        if not new:
            return
        self.ids.update(hits.ids[i] for i in new)
        self.order.extend(hits.ids[i] for i in new)
        self.sources.extend((hits.points, i) for i in new)
        self.styles.append(hits.styles[new])
        self.attention_keys.append(hits.attention_keys[new])

    def candidates(
        self, scene: Scene
    ) -> tuple[list[str], Sequence[ProductPoint], NDArray[np.float32], NDArray[np.float32]]:
        """The products seen (ids, products), and their styles and attention keys stacked."""
        if not self.sources:
            return [], [], _empty(scene), _empty(scene)
        styles, attention_keys = np.concatenate(self.styles), np.concatenate(self.attention_keys)
        self.styles, self.attention_keys = [styles], [attention_keys]
        return self.order, _Sourced(self.sources), styles, attention_keys


class _Sourced(Sequence[ProductPoint]):
    """Products gathered from several Hits, each taken from its Hits when asked for."""

    def __init__(self, sources: list[tuple[Sequence[ProductPoint], int]]) -> None:
        self._sources = list(sources)

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        points, j = self._sources[i]
        return points[j]


def _within(result: Result, max_distance: float) -> Result:
    """`result` without its products farther than `max_distance` (0: all kept). The products are sorted by
    distance, so what is kept is a prefix: exactly the uncut answer, filtered (compared in float32, the
    precision of the distances returned)."""
    if not max_distance:
        return result
    kept = int(np.searchsorted(result.ranked.distance, np.float32(max_distance), side="right"))
    result.products = result.products[:kept]
    result.ranked = Ranked(*(a[:kept] for a in result.ranked))
    return result


def _filtered(ask: Ask) -> bool:
    return bool(ask.query.conditions or ask.query.exclude_ids)


def _empty(scene: Scene) -> NDArray[np.float32]:
    return np.zeros((0, scene.global_.shape[0]), dtype=np.float32)


def _result(
    scene: Scene,
    ask: Ask,
    ids: Sequence[str],
    points: Sequence[ProductPoint],
    styles: NDArray[np.float32],
    attention_keys: NDArray[np.float32],
    size: int,
    certified: bool,
    rounds: int,
) -> Result:
    """Exact rerank of the candidates (row i of `styles`, `attention_keys`: ids[i], points[i]); keeps the best
    `ask.limit`, equal distances ordered by product id (the same answer in every mode)."""
    if not points:
        styles = attention_keys = _empty(scene)
    ranked = rank(scene, styles, attention_keys, ask.limit, tiebreak=ids)
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
