"""The one small async interface every model backend implements (in-process TorchScript, Triton).

Backends take uint8 images [B, S, S, 3] already decoded and letterboxed, and return float32 arrays with
the batch first, in request order (DESIGN.md §2, tensor contract). They never block the event loop.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoder_service.errors import BackendUnavailable


@dataclass(frozen=True)
class ModelInfoData:
    """What the backend serves; known once `start()` has returned."""

    model_version: str
    input_size: int
    grid: int
    regions: int
    embedding_dim: int
    backend: str
    model_config: dict[str, Any] = field(default_factory=dict)


SceneOutputs = tuple[np.ndarray, np.ndarray, np.ndarray]
ProductOutputs = tuple[np.ndarray, np.ndarray]


class EncoderBackend(abc.ABC):
    """Scene and product encoders behind one interface; one instance per process."""

    name: str = ""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load or connect; raises BackendUnavailable (with the cause) if the model cannot be served."""

    @property
    @abc.abstractmethod
    def info(self) -> ModelInfoData:
        """The served model; raises BackendUnavailable before `start()`, and ModelChanged while the model
        behind the backend is not the one `start()` found (its version labels every vector: a backend never
        adopts another model while it runs)."""

    @abc.abstractmethod
    async def encode_scenes(self, images: np.ndarray) -> SceneOutputs:
        """uint8 [B, S, S, 3] -> global [B, D], local [B, R, D], attention [B, R, D] (float32)."""

    @abc.abstractmethod
    async def encode_products(self, images: np.ndarray) -> ProductOutputs:
        """uint8 [B, S, S, 3] -> style [B, D], attention key [B, D] (float32)."""

    @abc.abstractmethod
    async def ready(self) -> bool:
        """A cheap check that the backend can still serve (no forward pass): reachable, and still the model
        `start()` found where that can change (False while it is another)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the model or the connection; idempotent."""


def check_images(images: np.ndarray, size: int) -> np.ndarray:
    """The batch as the encoders take it: C-contiguous uint8 [B, size, size, 3], B >= 1."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3) or not len(images):
        raise ValueError(
            f"expected uint8 [B, {size}, {size}, 3] with B >= 1, got {images.dtype} {images.shape}"
        )
    return np.ascontiguousarray(images)


def check_outputs(
    outputs: tuple[np.ndarray, ...], shapes: tuple[tuple[int, ...], ...], batch: int, where: str
) -> tuple[np.ndarray, ...]:
    """float32 outputs of the expected shapes; a mismatch means the backend serves another model."""
    if len(outputs) != len(shapes):
        raise BackendUnavailable(f"{where}: answered {len(outputs)} outputs, expected {len(shapes)}")
    checked = []
    for i, (array, shape) in enumerate(zip(outputs, shapes)):
        if array is None or tuple(array.shape) != (batch, *shape):
            got = None if array is None else list(array.shape)
            raise BackendUnavailable(f"{where}: OUTPUT__{i} has shape {got}, expected {[batch, *shape]}")
        checked.append(np.ascontiguousarray(array, dtype=np.float32))
    return tuple(checked)


async def in_chunks(
    images: np.ndarray, max_batch: int, forward: Callable[[np.ndarray], Awaitable[tuple[np.ndarray, ...]]]
) -> tuple[np.ndarray, ...]:
    """Runs `forward` on slices of at most `max_batch` images (the model's own limit) and joins them."""
    if len(images) <= max_batch:
        return await forward(images)
    parts = [await forward(images[i : i + max_batch]) for i in range(0, len(images), max_batch)]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))
