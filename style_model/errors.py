"""Errors of the style model package: one base class, a shallow tree."""


class StyleModelError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(StyleModelError, ValueError):
    """A model or training setting is invalid; the message names the bad value."""


class DatasetError(StyleModelError):
    """A dataset folder is missing files or holds records that cannot be read."""


class WeightsError(StyleModelError):
    """Pretrained backbone weights cannot be found, downloaded or loaded."""


class RunError(StyleModelError):
    """A training run folder is missing, incomplete or from an incompatible version."""
