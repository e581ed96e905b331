"""The one small async interface every model backend implements (in-process TorchScript, Triton).

Backends take uint8 images [B, S, S, 3] already decoded and letterboxed, and return float32 arrays with
the batch first, in request order (the tensor contract: `ctl.encoder_contract`). They never block the
event loop. What a backend serves is a `ctl.encoding.ModelInfo` (its limits left at 0: the service's).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable

import numpy as np

from ctl import encoder_contract as contract
from ctl.encoding import ModelInfo
from encoder_service.errors import BackendUnavailable

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
    def info(self) -> ModelInfo:
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


def encoder_specs(info: ModelInfo) -> dict[str, contract.EncoderSpec]:
    """The tensors of both encoders of the served model, by model name."""
    return contract.encoders(info.input_size, info.regions, info.embedding_dim)


def check_images(images: np.ndarray, input_size: int) -> np.ndarray:
    """The batch as the encoders take it: C-contiguous uint8 [B, S, S, 3], B >= 1."""
    dims = contract.input_dims(input_size)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != dims or not len(images):
        raise ValueError(
            f"expected uint8 [B, {', '.join(map(str, dims))}] with B >= 1, got {images.dtype} {images.shape}"
        )
    return np.ascontiguousarray(images)


def check_outputs(
    outputs: tuple[np.ndarray, ...], spec: contract.EncoderSpec, batch: int, where: str
) -> tuple[np.ndarray, ...]:
    """float32 outputs of the shapes `spec` names; a mismatch means the backend serves another model."""
    if len(outputs) != len(spec.outputs):
        raise BackendUnavailable(f"{where}: answered {len(outputs)} outputs, expected {len(spec.outputs)}")
    checked = []
    for array, tensor in zip(outputs, spec.outputs):
        expected = [batch, *tensor.dims]
        if array is None or list(array.shape) != expected:
            got = None if array is None else list(array.shape)
            raise BackendUnavailable(f"{where}: {tensor.name} has shape {got}, expected {expected}")
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
