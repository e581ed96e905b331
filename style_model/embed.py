"""Embeddings of bank images through a model, in batches: the one path that training, validation and
evaluation share (pixels through the backbone, or cached features straight into the heads)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from style_model.bank import FeatureBank, ImageBank
from style_model.distances import hybrid_distances, l2_normalize
from style_model.model import StyleModel


def image_features(
    model: StyleModel,
    bank: ImageBank,
    features: FeatureBank | None,
    indices: Sequence[int] | np.ndarray,
    domain: str,
    augment: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(regions, map mean, pooled) for bank images of one domain (scene crops or products): from the
    cache when frozen, else via the backbone."""
    if features is not None:
        return features.batch(indices)
    x = bank.batch(indices)
    if augment is not None:
        x = augment(x)
    return model.features(x, domain)


@dataclass
class SceneEmbeddings:
    global_: np.ndarray  # [N, D]
    local: np.ndarray  # [N, R, D]
    attention: np.ndarray  # [N, R, D]
    pooled: np.ndarray  # [N, C5] raw backbone vector (the raw-feature baseline)


@dataclass
class ProductEmbeddings:
    style: np.ndarray  # [N, D]
    keys: np.ndarray  # [N, D]
    pooled: np.ndarray  # [N, C5]


@torch.inference_mode()
def embed_scenes(model, bank, features, indices, batch_size: int = 128) -> SceneEmbeddings:
    model.eval()
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for start in range(0, len(indices), batch_size):
        regions, _, pooled = image_features(
            model, bank, features, indices[start : start + batch_size], "scene"
        )
        for store, value in zip(parts, (*model.heads.scene(regions, pooled), pooled)):
            store.append(value.numpy())
    return SceneEmbeddings(*(np.concatenate(p) if p else np.zeros((0,)) for p in parts))


@torch.inference_mode()
def embed_products(model, bank, features, indices, batch_size: int = 128) -> ProductEmbeddings:
    model.eval()
    parts: list[list[np.ndarray]] = [[], [], []]
    for start in range(0, len(indices), batch_size):
        _, map_mean, pooled = image_features(
            model, bank, features, indices[start : start + batch_size], "product"
        )
        for store, value in zip(parts, (*model.heads.product(map_mean, pooled), pooled)):
            store.append(value.numpy())
    return ProductEmbeddings(*(np.concatenate(p) if p else np.zeros((0,)) for p in parts))


def score_candidates(
    model: StyleModel,
    bank: ImageBank,
    features: FeatureBank | None,
    examples: Sequence,
    candidates: Sequence[Sequence[str]],
) -> dict[str, list[np.ndarray]]:
    """Distances of every example's scene crop to its candidate products (smaller = better), under the
    model's hybrid distance, its global and local halves, and the raw backbone vectors (negative
    cosine). Every image must be in `bank`; scoring uses the numpy distances the ranker serves with."""
    scene_idx = [bank.index[(e.scene, e.crop)] for e in examples]
    products = sorted({p for c in candidates for p in c})
    position = {p: i for i, p in enumerate(products)}
    scenes = embed_scenes(model, bank, features, scene_idx)
    prods = embed_products(model, bank, features, [bank.index[(p, None)] for p in products])
    raw_s, raw_p = l2_normalize(scenes.pooled), l2_normalize(prods.pooled)
    out: dict[str, list[np.ndarray]] = {"hybrid": [], "global": [], "local": [], "raw": []}
    for i, cands in enumerate(candidates):
        j = [position[p] for p in cands]
        d = hybrid_distances(
            scenes.global_[i],
            scenes.local[i],
            scenes.attention[i],
            prods.style[j],
            prods.keys[j],
            model.config.attention,
        )
        out["hybrid"].append(d.hybrid)
        out["global"].append(d.global_)
        out["local"].append(d.local)
        out["raw"].append(-(raw_p[j] @ raw_s[i]))
    return out
