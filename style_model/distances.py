"""The CTL distances in numpy: the ranker's exact rerank uses these (no torch import here).

All embeddings are unit length. For a scene s with global embedding f_s [D], local embeddings
f_i [R, D] and attention embeddings h_i [R, D], and products with style f_p [N, D] and attention key
c_p [N, D]:

    a_i(p) = softmax_i(-||h_i - c_p||^2)        closer regions weigh more ("paper")
    d_g(p) = ||f_s - f_p||^2
    d_l(p) = sum_i a_i(p) ||f_i - f_p||^2
    d(p)   = (d_g + d_l) / 2                    the hybrid distance

`attention="seed"` is the seed Keras tutorial's variant (softmax of the positive distance), kept only
as an evaluation baseline. Every function is vectorised over products; inputs are never modified.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from style_model.config import ATTENTIONS

Array = NDArray[np.floating]

# What serving ranks with (the ranker's rerank and certificate): export refuses models trained otherwise,
# and the ranker refuses an encoder whose model says otherwise.
SERVED_ATTENTION = "paper"


class HybridDistances(NamedTuple):
    """Per-product distances [N] and the region attention weights [N, R] that produced them."""

    hybrid: Array
    global_: Array
    local: Array
    attention: Array


def _as_2d(x: ArrayLike, name: str) -> Array:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a [N, D] or [D] array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    return a


def squared_distances(a: ArrayLike, b: ArrayLike) -> Array:
    """||a_i - b_j||^2 for every pair: [A, D] x [B, D] -> [A, B], clipped at 0 against rounding."""
    a2, b2 = _as_2d(a, "a"), _as_2d(b, "b")
    if a2.shape[1] != b2.shape[1]:
        raise ValueError(f"dimension mismatch: {a2.shape[1]} vs {b2.shape[1]}")
    d = (a2 * a2).sum(1)[:, None] + (b2 * b2).sum(1)[None, :] - 2.0 * (a2 @ b2.T)
    return np.maximum(d, 0.0)


def attention_weights(scene_attention: ArrayLike, keys: ArrayLike, attention: str = "paper") -> Array:
    """Region weights [N, R] for products with attention keys [N, D] against h_i [R, D]."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: expected one of {', '.join(ATTENTIONS)}")
    logits = squared_distances(keys, scene_attention)  # [N, R]
    if attention == "paper":
        logits = -logits
    logits = logits - logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def hybrid_distances(
    scene_global: ArrayLike,
    scene_local: ArrayLike,
    scene_attention: ArrayLike,
    product_style: ArrayLike,
    product_keys: ArrayLike,
    attention: str = "paper",
) -> HybridDistances:
    """Global, attention-weighted local and hybrid distances of one scene to N products."""
    f_s = _as_2d(scene_global, "scene_global")
    f_i = _as_2d(scene_local, "scene_local")
    h_i = _as_2d(scene_attention, "scene_attention")
    f_p = _as_2d(product_style, "product_style")
    c_p = _as_2d(product_keys, "product_keys")
    if f_s.shape[0] != 1:
        raise ValueError(f"scene_global: expected one scene, got {f_s.shape[0]}")
    if f_i.shape != h_i.shape:
        raise ValueError(f"scene_local {f_i.shape} and scene_attention {h_i.shape} differ in shape")
    if f_p.shape[0] != c_p.shape[0]:
        raise ValueError(f"{f_p.shape[0]} product styles but {c_p.shape[0]} attention keys")
    weights = attention_weights(h_i, c_p, attention)  # [N, R]
    d_global = squared_distances(f_p, f_s)[:, 0]  # [N]
    d_local = (weights * squared_distances(f_p, f_i)).sum(axis=1)  # [N]
    return HybridDistances(0.5 * (d_global + d_local), d_global, d_local, weights)


def l2_normalize(x: ArrayLike, axis: int = -1, eps: float = 1e-12) -> Array:
    """x / ||x|| along `axis`, returning a new array; zero vectors stay zero (epsilon guard)."""
    a = np.asarray(x, dtype=np.float64 if np.asarray(x).dtype == np.float64 else np.float32)
    norm = np.linalg.norm(a, axis=axis, keepdims=True)
    return a / np.maximum(norm, eps)
