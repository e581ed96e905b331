"""The evaluation protocol (paper): FITB and HR@K over same-category candidates.

FITB: the true product among it and 3 sampled same-category negatives; HR@K: the true product among
100 same-category candidates (all of them, if the category has fewer). Negatives never appear in the
example's scene. Candidates are sampled deterministically per example, so every method in a table is
scored on exactly the same candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from style_model.data.examples import Example, seeded_rng
from style_model.data.stl import Dataset

FITB_NEGATIVES = 3
HR_CANDIDATES = 100
HR_KS = (1, 5, 10)


@dataclass(frozen=True)
class Candidates:
    """Per example, product signatures with the true product first."""

    examples: list[Example]
    products: list[list[str]]


def sample_candidates(
    examples: list[Example],
    dataset: Dataset,
    negatives: int,
    seed: int = 0,
    tag: str = "fitb",
    usable: Callable[[str], bool] | None = None,
) -> Candidates:
    """Up to `negatives` same-category products per example that are not in its scene and, when `usable`
    is given, have a usable image: a candidate without one is never drawn, so scoring never fails."""
    in_scene = dataset.products_in_scene
    lists = []
    for e in examples:
        pool = [
            p
            for p in dataset.products_by_category[e.category]
            if p not in in_scene[e.scene] and (usable is None or usable(p))
        ]
        rng = seeded_rng(seed, tag, e.scene, e.positive)
        chosen = rng.sample(pool, min(negatives, len(pool)))
        lists.append([e.positive, *chosen])
    return Candidates(examples, lists)


def ranks(distances: list[np.ndarray]) -> np.ndarray:
    """1-based rank of the true product (index 0); ties count half, so a constant scorer is not rewarded.
    A list with a non-finite distance (NaN, inf) ranks last of all (inf): a diverged model hits nothing."""
    out = np.empty(len(distances))
    for i, d in enumerate(distances):
        if not np.isfinite(d).all():
            out[i] = np.inf
            continue
        better = np.sum(d[1:] < d[0])
        ties = np.sum(d[1:] == d[0])
        out[i] = 1 + better + 0.5 * ties
    return out


def fitb_accuracy(distances: list[np.ndarray]) -> float:
    return float(np.mean(ranks(distances) == 1)) if distances else float("nan")


def hit_rates(distances: list[np.ndarray], ks=HR_KS) -> dict[str, float]:
    r = ranks(distances)
    return {f"hr@{k}": float(np.mean(r <= k)) if len(r) else float("nan") for k in ks}
