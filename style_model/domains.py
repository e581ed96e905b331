"""Scenes and products are two image domains, and BatchNorm must keep them apart at inference too.

Training passes scenes and products through the network in separate batches, so every BatchNorm
normalises each domain with that domain's own batch statistics (one batch of both was tried and trains
worse: docs/RESULTS.md). A plain BatchNorm then keeps ONE running average of both, and at inference it
normalises scenes and products with that blend: the model served is not the model trained. Here every
BatchNorm keeps one set of running statistics per domain (affine parameters stay shared), and the scene
and product encoders each use their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DOMAINS = ("scene", "product")


class DomainBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with running statistics per domain. `running_mean`/`running_var` are the scene's (so a
    torchvision checkpoint loads by its names), `product_mean`/`product_var` the product's. A state
    without the product's (torchvision's ImageNet file, or a model trained before the split) gives
    products the same statistics as scenes: exactly what such a model did before."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True)
        self.register_buffer("product_mean", torch.zeros(num_features))
        self.register_buffer("product_var", torch.ones(num_features))
        self.register_buffer("product_batches", torch.tensor(0, dtype=torch.long))
        self.domain = "scene"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if self.domain == "scene":
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0
        if self.training:
            self.product_batches.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.product_batches)
        return F.batch_norm(
            input,
            self.product_mean,
            self.product_var,
            self.weight,
            self.bias,
            self.training,
            factor,
            self.eps,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for own, theirs in (("mean", "running_mean"), ("var", "running_var")):
            if prefix + f"product_{own}" not in state_dict and prefix + theirs in state_dict:
                state_dict[prefix + f"product_{own}"] = state_dict[prefix + theirs].clone()
        if prefix + "product_batches" not in state_dict and prefix + "num_batches_tracked" in state_dict:
            state_dict[prefix + "product_batches"] = state_dict[prefix + "num_batches_tracked"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def split_statistics(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm under `module` by a DomainBatchNorm with the same parameters and state."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, DomainBatchNorm):
            norm = DomainBatchNorm(child.num_features, child.eps, child.momentum)
            norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            split_statistics(child)
    return module


def set_domain(module: nn.Module, domain: str) -> None:
    """Make every DomainBatchNorm under `module` normalise (and, in training, track) `domain`."""
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}: expected one of {DOMAINS}")
    for m in module.modules():
        if isinstance(m, DomainBatchNorm):
            m.domain = domain
