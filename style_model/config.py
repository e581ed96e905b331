"""The one record that describes a model: architecture, input size and preprocessing.

It is stored with every checkpoint and exported with the TorchScript encoders, so a served model
always knows how it was built (timm's `_cfg`, torchvision's `Weights.meta`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ctl import settings
from ctl.settings import at_least, in_range, more_than, setting
from style_model.errors import ConfigError

# The backbones, written once (the CLI's choices, the checks, style_model.backbones' builders); the fixed
# ones have nothing to learn: always used frozen, through the feature cache.
BACKBONES = ("resnet50", "resnet18", "small", "colorhist")
FIXED_BACKBONES = ("colorhist",)
# The attention kinds (style_model.distances): the paper's, and the seed tutorial's variant.
ATTENTIONS = ("paper", "seed")
# The architecture's ranges, written once: ModelConfig's checks and `ctl train`'s (named by flag or variable).
GRID_RANGE = in_range(1, 16)
EMBED_DIM_RANGE = in_range(2, 4096)


def input_size_range(value: int) -> str | None:
    return None if 32 <= value <= 1024 and value % 16 == 0 else "expected a multiple of 16 in [32, 1024]"


def grid_fits(grid: int, input_size: int) -> str | None:
    """Why `grid` regions per side do not fit images of `input_size` (the stage-4 map is 1/16), or None."""
    side = input_size // 16
    if side >= grid:
        return None
    return (
        f"grid={grid} needs a stage-4 map of at least {grid}x{grid}: input_size={input_size} gives "
        f"{side}x{side}"
    )


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
        for name, check in (("input_size", input_size_range), ("grid", GRID_RANGE)):
            problem = check(getattr(self, name))
            if problem:
                raise ConfigError(f"{name}={getattr(self, name)}: {problem}")
        problem = grid_fits(self.grid, self.input_size)
        if problem:
            raise ConfigError(problem)
        problem = EMBED_DIM_RANGE(self.embed_dim)
        if problem:
            raise ConfigError(f"embed_dim={self.embed_dim}: {problem}")
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


TRAIN_ENV_PREFIX = "CTL_TRAIN_"  # `ctl train`'s variables: CTL_TRAIN_STEPS, CTL_TRAIN_LR...
_PRESETS_DECIDE = "default: the preset's"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; None means "the preset's value" (style_model.train.resolve fills it). Here,
    not in style_model.train (torch), so that `ctl train` builds its flags and CTL_TRAIN_* variables from it
    (ctl.settings) in an image without torch. Every value is checked here, naming the field; the model's
    own rules (input_size, grid and embed_dim together) are ModelConfig's, applied when the preset is."""

    preset: str = dataclasses.field(
        default="auto",
        metadata=setting(
            "auto: paper when ImageNet weights can be had, else offline", choices=PRESET_CHOICES
        ),
    )
    backbone: str | None = dataclasses.field(
        default=None, metadata=setting(f"the image backbone ({_PRESETS_DECIDE})", choices=BACKBONES)
    )
    weights: str | None = dataclasses.field(
        default=None,
        metadata=setting(
            f"torchvision ImageNet checkpoint FILE, 'imagenet' (download) or 'none' ({_PRESETS_DECIDE})"
        ),
    )
    input_size: int | None = dataclasses.field(
        default=None,
        metadata=setting(
            f"image side in pixels, a multiple of 16 ({_PRESETS_DECIDE})", check=input_size_range
        ),
    )
    train_backbone: bool | None = dataclasses.field(
        default=None, metadata=setting(f"train the backbone too ({_PRESETS_DECIDE})", switch=True)
    )
    steps: int | None = dataclasses.field(
        default=None,
        metadata=setting(
            "optimizer steps (default: the preset's epochs, at least 2000 steps)", check=at_least(1)
        ),
    )
    epochs: int | None = dataclasses.field(
        default=None, metadata=setting("train this many epochs instead of a step budget", check=at_least(1))
    )
    max_minutes: float | None = dataclasses.field(
        default=None,
        metadata=setting("wall-time budget; the best model so far is kept", check=at_least(0)),
    )
    patience: int = dataclasses.field(
        default=3,
        metadata=setting(
            "validations without gain, once half the budget is done, before an early stop",
            check=at_least(0),
        ),
    )
    eval_every: int | None = dataclasses.field(
        default=None,
        metadata=setting(
            "steps between validations (default: a tenth of the budget, or each epoch with --epochs)",
            check=at_least(1),
        ),
    )
    restarts: int = dataclasses.field(
        default=1,
        metadata=setting(
            "restarts with another seed when still on the collapsed plateau at half the budget",
            check=at_least(0),
        ),
    )
    batch_size: int | None = dataclasses.field(
        default=None, metadata=setting(f"examples per step ({_PRESETS_DECIDE})", check=at_least(1))
    )
    lr: float | None = dataclasses.field(
        default=None, metadata=setting(f"peak learning rate ({_PRESETS_DECIDE})", check=more_than(0))
    )
    weight_decay: float = dataclasses.field(
        default=1e-4, metadata=setting("AdamW weight decay", check=at_least(0))
    )
    margin: float = dataclasses.field(
        default=0.2, metadata=setting("margin of the triplet loss", check=more_than(0))
    )
    grid: int = dataclasses.field(
        default=4, metadata=setting("regions per side of the scene (R = grid²)", check=GRID_RANGE)
    )
    embed_dim: int = dataclasses.field(
        default=128, metadata=setting("embedding dimension", check=EMBED_DIM_RANGE)
    )
    attention: str = dataclasses.field(
        default="paper",
        metadata=setting("paper (closer regions weigh more) or seed (the tutorial's)", choices=ATTENTIONS),
    )
    augment: bool = dataclasses.field(
        default=True,
        metadata=setting("augment the images (shifts, scales, light) when the backbone trains", switch=True),
    )
    min_crop: float = dataclasses.field(
        default=0.2,
        metadata=setting(
            "smallest share of the scene a crop keeps; smaller ones are skipped", check=in_range(0, 1)
        ),
    )
    seed: int = dataclasses.field(default=0, metadata=setting("random seed"))
    workers: int = dataclasses.field(
        default=2, metadata=setting("threads decoding images", check=at_least(1))
    )
    domain: str | None = dataclasses.field(
        default=None, metadata=setting("domain, when the folder has several (fashion, home)")
    )
    max_examples: int | None = dataclasses.field(
        default=None, metadata=setting("cap on training examples (quick runs, tests)", check=at_least(1))
    )
    cache_dir: str | None = dataclasses.field(
        default=None, metadata=setting("feature cache for frozen backbones (default: RUN/feature-cache)")
    )

    def __post_init__(self) -> None:
        settings.check_fields(self, ConfigError)
        # an input size given (flag, variable or code) must hold the grid; a preset's size is checked when
        # it is applied (ModelConfig)
        problem = None if self.input_size is None else grid_fits(self.grid, self.input_size)
        if problem:
            raise ConfigError(f"{problem} (--grid / --input-size)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
