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

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from ctl.tensors import Scene
from style_model.distances import attention_weights, hybrid_distances

F32 = NDArray[np.float32]


class Ranked(NamedTuple):
    """The best `limit` of N scored products: their indices into the input, best first, and distances."""

    order: NDArray[np.intp]
    distance: F32
    global_: F32
    local: F32
    attention: F32  # [K, R]


def pooled_query(scene: Scene, mean_key: NDArray | None) -> F32:
    """q = f_s + Σ ā_i f_i with ā the scene's attention against the category's mean key (uniform without
    one). Dot products with q order products like S(p) when their keys are near the mean."""
    regions = scene.local.shape[0]
    if mean_key is None:
        weights = np.full((1, regions), 1.0 / regions, dtype=np.float32)
    else:
        weights = attention_weights(scene.attention, np.asarray(mean_key, dtype=np.float32)[None, :])
    return (scene.global_ + weights[0] @ scene.local).astype(np.float32)


def bound_queries(scene: Scene) -> F32:
    """The R vectors f_s + f_i: the largest dot product with them bounds S(p) from above."""
    return (scene.global_[None, :] + scene.local).astype(np.float32)


def rank(scene: Scene, styles: NDArray, keys: NDArray, limit: int) -> Ranked:
    """Exact hybrid distances of N products [N, D] and the best `limit`, ties broken by input order."""
    if len(styles) == 0:
        empty = np.zeros(0, dtype=np.float32)
        return Ranked(
            np.zeros(0, dtype=np.intp), empty, empty, empty, np.zeros((0, len(scene.local)), np.float32)
        )
    d = hybrid_distances(scene.global_, scene.local, scene.attention, styles, keys)
    k = min(limit, len(styles))
    if k < len(styles):
        top = np.argpartition(d.hybrid, k - 1)[:k]
        order = top[np.lexsort((top, d.hybrid[top]))]
    else:
        order = np.lexsort((np.arange(len(styles)), d.hybrid))
    return Ranked(
        order,
        d.hybrid[order].astype(np.float32),
        d.global_[order].astype(np.float32),
        d.local[order].astype(np.float32),
        d.attention[order].astype(np.float32),
    )


def certified(kth_best_distance: float, bounds: NDArray, slack: float = 1e-5) -> bool:
    """True when no product outside the scored set can beat the K-th best.

    `bounds` [R] holds, for each query f_s + f_i, the score of its last returned product (−inf when the
    query returned the whole filtered category). Every unscored product p then has U(p) ≤ max(bounds), so
    its distance is ≥ 2 − max(bounds); `slack` absorbs float32 rounding in the engine's scores.
    """
    return bool(kth_best_distance <= 2.0 - float(np.max(bounds)) - slack)
