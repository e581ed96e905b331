"""The style model: backbone, heads g/l/h, regions, and the torch distances used in training.

Heads are small MLPs (Linear -> BatchNorm -> ReLU -> Dropout -> Linear -> L2-normalise):
  g: pooled last-stage vector -> global/style embedding (scene f_s, product f_p)
  l: one stage-4 region feature -> local embedding f_i
  h: stage-4 feature -> attention embedding (scene h_i per region, product key c_p from its pooled map)
Regions are the stage-4 map average-pooled to a grid x grid lattice: one backbone pass per scene.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from style_model.backbones import build_backbone
from style_model.config import ModelConfig
from style_model.domains import set_domain, split_statistics


class Head(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=-1)


class StyleHeads(nn.Module):
    """g, l, h over backbone features: shared by the image model and the feature-cache trainer."""

    def __init__(self, config: ModelConfig, region_channels: int, pooled_channels: int):
        super().__init__()
        self.config = config
        d, hid, p = config.embed_dim, config.hidden_dim, config.dropout
        self.g = Head(pooled_channels, hid, d, p)
        self.l = Head(region_channels, hid, d, p)
        self.h = Head(region_channels, hid, d, p)
        self.region_pool = nn.AdaptiveAvgPool2d((config.grid, config.grid))

    def features(self, stage4: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone taps -> what the heads read: regions [B, R, C4], mean stage-4 feature [B, C4], pooled
        [B, C5]. A frozen backbone's features are cached in this form (small: R x C4, not H x W x C4)."""
        regions = self.region_pool(stage4).flatten(2).transpose(1, 2)
        return regions, stage4.mean(dim=(2, 3)), pooled

    def scene(self, regions: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(f_s [B, D], f_i [B, R, D], h_i [B, R, D])."""
        set_domain(self, "scene")
        b, r, c = regions.shape
        flat = regions.reshape(b * r, c)
        local = self.l(flat).reshape(b, r, -1)
        attention = self.h(flat).reshape(b, r, -1)
        return self.g(pooled), local, attention

    def product(self, map_mean: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """(f_p [B, D], c_p [B, D]); the key comes from the product's own pooled stage-4 map."""
        set_domain(self, "product")
        return self.g(pooled), self.h(map_mean)


def to_unit(images: Tensor) -> Tensor:
    """uint8 [B, S, S, 3] (HWC, as served) -> float [B, 3, S, S] in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div(255.0)


class StyleModel(nn.Module):
    """Backbone + heads. `features` takes images in [0, 1] ([B, 3, S, S]) and normalises them itself,
    so that training, evaluation and the exported encoders share one preprocessing."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.backbone = build_backbone(config.backbone)
        if hasattr(self.backbone, "fc"):
            self.backbone.fc = nn.Identity()  # the classifier is only kept for strict checkpoint loading
        self.heads = StyleHeads(config, self.backbone.region_channels, self.backbone.pooled_channels)
        split_statistics(self)  # one set of BatchNorm statistics per domain (style_model/domains.py)

    def features(self, unit_images: Tensor, domain: str) -> tuple[Tensor, Tensor, Tensor]:
        """Backbone taps of scene or product images (`domain` picks the BatchNorm statistics)."""
        set_domain(self.backbone, domain)
        x = (unit_images - self.mean) / self.std
        return self.heads.features(*self.backbone.forward_features(x))

    def encode_scene(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        regions, _, pooled = self.features(images, "scene")
        return self.heads.scene(regions, pooled)

    def encode_product(self, images: Tensor) -> tuple[Tensor, Tensor]:
        _, map_mean, pooled = self.features(images, "product")
        return self.heads.product(map_mean, pooled)


def attention_weights(scene_attention: Tensor, keys: Tensor, attention: str = "paper") -> Tensor:
    """a_i = softmax_i(-||h_i - c_p||^2) ("paper") or of +||.||^2 ("seed"): [B, R, D], [B, D] -> [B, R]."""
    sq = (scene_attention - keys[:, None, :]).pow(2).sum(-1)
    return torch.softmax(-sq if attention == "paper" else sq, dim=-1)


def hybrid_distance_matrix(
    scene_global: Tensor,
    scene_local: Tensor,
    scene_attention: Tensor,
    product_style: Tensor,
    product_keys: Tensor,
    attention: str = "paper",
) -> Tensor:
    """Hybrid distance of every scene to every product: [B, ...] scenes x [P, D] products -> [B, P].

    Uses ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b, so no [B, P, R, D] tensor is ever built."""

    def sq(a: Tensor, b: Tensor) -> Tensor:  # [..., N, D] x [P, D] -> [..., N, P]
        return (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1) - 2 * a @ b.T).clamp_min(0)

    d_global = sq(scene_global, product_style)  # [B, P]
    key_dist = sq(scene_attention, product_keys).transpose(1, 2)  # [B, P, R]
    weights = torch.softmax(-key_dist if attention == "paper" else key_dist, dim=-1)
    local_dist = sq(scene_local, product_style).transpose(1, 2)  # [B, P, R]
    return 0.5 * (d_global + (weights * local_dist).sum(-1))


def hybrid_distance(
    scene_global: Tensor,
    scene_local: Tensor,
    scene_attention: Tensor,
    product_style: Tensor,
    product_keys: Tensor,
    attention: str = "paper",
) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise (hybrid, global, local) distances of B scenes to B products, each [B]."""
    d_global = (scene_global - product_style).pow(2).sum(-1)
    weights = attention_weights(scene_attention, product_keys, attention)
    d_local = (weights * (scene_local - product_style[:, None, :]).pow(2).sum(-1)).sum(-1)
    return 0.5 * (d_global + d_local), d_global, d_local
