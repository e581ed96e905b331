"""The one record that describes a model: architecture, input size and preprocessing.

It is stored with every checkpoint and exported with the TorchScript encoders, so a served model
always knows how it was built (timm's `_cfg`, torchvision's `Weights.meta`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from style_model.distances import ATTENTIONS
from style_model.errors import ConfigError

# The backbones, written once (the CLI's choices, the checks, style_model.backbones' builders); the fixed
# ones have nothing to learn: always used frozen, through the feature cache.
BACKBONES = ("resnet50", "resnet18", "small", "colorhist")
FIXED_BACKBONES = ("colorhist",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and preprocessing of a style model.

    `attention` is "paper" (softmax of the negative squared distance, closer regions weigh more) or
    "seed" (softmax of the positive distance, as the seed Keras tutorial does; kept as a baseline).
    """

    backbone: str = "small"
    input_size: int = 96
    grid: int = 4
    embed_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.1
    attention: str = "paper"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone={self.backbone!r}: expected one of {', '.join(BACKBONES)}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention={self.attention!r}: expected one of {', '.join(ATTENTIONS)}")
        if not 32 <= self.input_size <= 1024 or self.input_size % 16:
            raise ConfigError(f"input_size={self.input_size}: expected a multiple of 16 in [32, 1024]")
        if not 1 <= self.grid <= 16:
            raise ConfigError(f"grid={self.grid}: expected 1..16")
        if self.input_size // 16 < self.grid:
            raise ConfigError(
                f"grid={self.grid} needs a stage-4 map of at least {self.grid}x{self.grid}: "
                f"input_size={self.input_size} gives {self.input_size // 16}x{self.input_size // 16}"
            )
        if not 2 <= self.embed_dim <= 4096:
            raise ConfigError(f"embed_dim={self.embed_dim}: expected 2..4096")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}: expected [0, 1)")

    @property
    def regions(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict[str, Any]] = {
    # epochs with a floor of min_steps optimizer steps: see plan_budget
    "paper": dict(
        backbone="resnet50",
        input_size=224,
        train_backbone=False,
        epochs=30,
        min_steps=2000,
        batch_size=128,
        lr=1e-3,
    ),
    "offline": dict(
        backbone="small", input_size=96, train_backbone=True, epochs=8, min_steps=2000, batch_size=64, lr=2e-3
    ),
}

PRESET_CHOICES = ("auto", *PRESETS)  # auto: paper when ImageNet weights can be had, else offline


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; None means "the preset's value". Here, not in style_model.train (torch),
    so that `ctl train`'s flags take their defaults from it in an image without torch."""

    preset: str = "auto"
    backbone: str | None = None
    weights: str | None = None  # a torchvision checkpoint file, "imagenet", "none", or None (the preset's)
    input_size: int | None = None
    train_backbone: bool | None = None
    steps: int | None = None  # optimizer steps; None: --epochs, else the preset's (see plan_budget)
    epochs: int | None = None
    max_minutes: float | None = None  # wall-time budget: stop (and keep the best model) when it runs out
    patience: int = 3  # validations without gain, once half the budget is done, before stopping early
    eval_every: int | None = None  # steps between validations; None: a tenth of the budget, or each epoch
    restarts: int = 1  # restarts with another seed when still on the collapsed plateau at half the budget
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-4
    margin: float = 0.2
    grid: int = 4
    embed_dim: int = 128
    attention: str = "paper"
    augment: bool = True
    min_crop: float = 0.2
    seed: int = 0
    workers: int = 2
    domain: str | None = None
    max_examples: int | None = None  # cap on training examples (quick runs, tests)
    cache_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
