"""The ranker's numpy kernels: the pooled query vector, the exact hybrid rerank, the certificate bound.

With unit vectors the hybrid distance is d(s, p) = 2 − S(p), S(p) = f_s·f_p + Σ_i a_i(p) f_i·f_p, where the
attention a(p) depends on the product's key c_p (DESIGN.md §2, "Retrieval"). So:
- candidates come from one vector query with q = f_s + Σ_i ā_i f_i, ā = attention against the category's
  mean key (`pooled_query`);
- candidates are ranked by the exact distance (`rank`, via style_model.distances.hybrid_distances);
- S(p) ≤ U(p) = max_i (f_s + f_i)·f_p (the a_i are a convex combination), so querying the R vectors
  f_s + f_i exactly bounds every product not yet scored (`bound_queries`, `certified`).
Pure functions over arrays; inputs are never modified; no Python loop per product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from ctl.tensors import Scene
from style_model.distances import attention_weights, hybrid_distances

F32 = NDArray[np.float32]
_SCREEN_MARGIN = 1e-4  # far above float32's error on distances of unit vectors (~1e-6)


class Ranked(NamedTuple):
    """The best `limit` of N scored products: their indices into the input, best first, and distances."""

    order: NDArray[np.intp]
    distance: F32
    global_: F32
    local: F32
    attention: F32  # [K, R]


def pooled_query(scene: Scene, mean_attention_key: NDArray | None) -> F32:
    """q = f_s + Σ ā_i f_i with ā the scene's attention against the category's mean key (uniform without
    one). Dot products with q order products like S(p) when their attention keys are near the mean."""
    regions = scene.local.shape[0]
    if mean_attention_key is None:
        weights = np.full((1, regions), 1.0 / regions, dtype=np.float32)
    else:
        weights = attention_weights(
            scene.attention, np.asarray(mean_attention_key, dtype=np.float32)[None, :]
        )
    return (scene.global_ + weights[0] @ scene.local).astype(np.float32)


def bound_queries(scene: Scene) -> F32:
    """The R vectors f_s + f_i: the largest dot product with them bounds S(p) from above."""
    return (scene.global_[None, :] + scene.local).astype(np.float32)


def rank(
    scene: Scene, styles: NDArray, attention_keys: NDArray, limit: int, tiebreak: Sequence[str] | None = None
) -> Ranked:
    """Exact hybrid distances of N products [N, D] and the best `limit`. Equal distances are ordered by
    `tiebreak` (e.g. product ids: the same answer whichever order the candidates came in), else by input
    order, also at the cut-off: of ten copies of one product, the first ones are kept.

    Distances are screened in float32, then the products near the cut-off are scored again in float64 and
    rounded to float32: float32 BLAS gives equal rows results that differ in the last bit depending on
    their position in the batch, so copies of one product would not tie, and modes would disagree."""
    n = len(styles)
    if n == 0:
        empty = np.zeros(0, dtype=np.float32)
        return Ranked(
            np.zeros(0, dtype=np.intp), empty, empty, empty, np.zeros((0, len(scene.local)), np.float32)
        )
    k = min(limit, n)
    near = np.arange(n)
    if k < n:
        screen = hybrid_distances(scene.global_, scene.local, scene.attention, styles, attention_keys).hybrid
        near = np.flatnonzero(screen <= np.partition(screen, k - 1)[k - 1] + _SCREEN_MARGIN)
    as64 = [np.asarray(a, dtype=np.float64) for a in scene]
    exact = hybrid_distances(
        *as64, *(np.asarray(a)[near].astype(np.float64) for a in (styles, attention_keys))
    )
    d = exact.hybrid.astype(np.float32)
    if k < len(near):
        kth = np.partition(d, k - 1)[k - 1]
        below = np.flatnonzero(d < kth)
        tied = np.flatnonzero(d == kth)
        if tiebreak is not None and len(tied) > k - len(below):
            tied = tied[np.argsort(np.array([tiebreak[near[i]] for i in tied]), kind="stable")]
        chosen = np.concatenate([below, tied[: k - len(below)]])
    else:
        chosen = np.arange(len(near))
    second = near[chosen] if tiebreak is None else np.array([tiebreak[near[i]] for i in chosen])
    best = chosen[np.lexsort((second, d[chosen]))]
    return Ranked(
        near[best],
        d[best],
        exact.global_[best].astype(np.float32),
        exact.local[best].astype(np.float32),
        exact.attention[best].astype(np.float32),
    )


def certified(kth_best_distance: float, bounds: NDArray, slack: float = 1e-5) -> bool:
    """True when no product outside the scored set can beat the K-th best.

    `bounds` [R] holds, for each query f_s + f_i, the score of its last returned product (−inf when the
    query returned the whole filtered category). Every unscored product p then has U(p) ≤ max(bounds), so
    its distance is ≥ 2 − max(bounds); `slack` absorbs float32 rounding in the engine's scores.
    """
    return bool(kth_best_distance <= 2.0 - float(np.max(bounds)) - slack)
