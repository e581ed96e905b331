"""Pretrained backbone weights: torchvision's ImageNet checkpoints, loaded strictly by parameter name."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from style_model.errors import WeightsError

# torchvision's official ImageNet checkpoints (IMAGENET1K_V1 for resnet50 and resnet18)
IMAGENET_URLS = {
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
}
# CTL_OFFLINE=1 forbids download attempts (tests set it: nothing may be fetched at run time there)
OFFLINE_ENV = "CTL_OFFLINE"


def hub_cache_file(backbone: str) -> Path | None:
    """The checkpoint in torch hub's cache (where `torch.hub` downloads it), if it is there."""
    url = IMAGENET_URLS.get(backbone)
    if url is None:
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return path if path.is_file() else None


def resolve_imagenet(backbone: str, weights: str | None) -> tuple[Path | None, str]:
    """Where ImageNet weights for `backbone` can be had: (file or None, how it was decided)."""
    if weights not in (None, "imagenet"):
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"--weights {weights}: no such file")
        return path, f"weights file {path}"
    if backbone not in IMAGENET_URLS:
        return None, f"no ImageNet checkpoint is known for backbone {backbone!r}"
    cached = hub_cache_file(backbone)
    if cached is not None:
        return cached, f"torch hub cache {cached}"
    if os.environ.get(OFFLINE_ENV) == "1":
        return None, "not in the torch hub cache and downloads are off"
    try:
        torch.hub.load_state_dict_from_url(IMAGENET_URLS[backbone], progress=True, check_hash=True)
    except Exception as exc:  # no network, proxy, HTTP error: all mean "not available"
        return None, f"download of {IMAGENET_URLS[backbone]} failed ({exc.__class__.__name__}: {exc})"
    cached = hub_cache_file(backbone)
    return cached, f"downloaded {IMAGENET_URLS[backbone]}"


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a torchvision-layout checkpoint strictly (the classifier `fc` included when present)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable torch checkpoint: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = backbone.state_dict()
    if "fc.weight" not in own:  # our model drops the classifier; the checkpoint may still have it
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: does not match the backbone: {exc}") from exc
