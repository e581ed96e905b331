"""The in-process backend: the exported TorchScript encoders, run on the CPU in a worker thread.

It loads the same files Triton would (`ctl.encoder_contract.model_file`), so both backends give the same
embeddings. Forward passes run under `torch.inference_mode` in `asyncio.to_thread`:
the event loop keeps answering while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctl.encoder_contract import MAX_BATCH_SIZE, PRODUCT_ENCODER, SCENE_ENCODER, model_file
from ctl.encoding import ModelInfo
from encoder_service.backends.base import (
    EncoderBackend,
    ProductOutputs,
    SceneOutputs,
    check_images,
    check_outputs,
    encoder_specs,
    in_chunks,
)
from encoder_service.errors import BackendUnavailable
from style_model.export import load_encoder

log = logging.getLogger(__name__)


class TorchScriptBackend(EncoderBackend):
    """Both encoders loaded in this process; `torch_threads` > 0 sets torch's intra-op threads."""

    name = "torchscript"

    def __init__(self, repo: Path | str, torch_threads: int = 0, max_batch: int = MAX_BATCH_SIZE):
        self.repo = Path(repo)
        self.torch_threads = torch_threads
        self.max_batch = max_batch
        self._scene: torch.jit.ScriptModule | None = None
        self._product: torch.jit.ScriptModule | None = None
        self._info: ModelInfo | None = None

    async def start(self) -> None:
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        loaded = {}
        for model in (SCENE_ENCODER, PRODUCT_ENCODER):
            path = model_file(self.repo, model)
            if not path.is_file():
                raise BackendUnavailable(
                    f"no exported {model} at {path} (run `ctl export --out {self.repo}`)"
                )
            try:
                loaded[model] = await asyncio.to_thread(load_encoder, path)
            except Exception as exc:  # torch.jit.load raises RuntimeError for damaged files
                raise BackendUnavailable(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
        (scene, scene_meta), (product, product_meta) = loaded[SCENE_ENCODER], loaded[PRODUCT_ENCODER]
        if not scene_meta["model_version"]:
            raise BackendUnavailable(
                f"{model_file(self.repo, SCENE_ENCODER)} carries no model version; re-export it"
            )
        if scene_meta["model_version"] != product_meta["model_version"]:
            raise BackendUnavailable(
                f"{self.repo}: {SCENE_ENCODER} is model version {scene_meta['model_version']!r} but "
                f"{PRODUCT_ENCODER} is {product_meta['model_version']!r}; export both from the same run"
            )
        self._info = _info_from_config(scene_meta["model_version"], scene_meta["config"], self.name)
        self._scene, self._product = scene, product
        log.info(
            "TorchScript encoders from %s: model version %s, %d px, %d regions, %d-d (%d torch threads)",
            self.repo,
            self._info.model_version,
            self._info.input_size,
            self._info.regions,
            self._info.embedding_dim,
            torch.get_num_threads(),
        )

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise BackendUnavailable("the TorchScript encoders are not loaded")
        return self._info

    async def encode_scenes(self, images: np.ndarray) -> SceneOutputs:
        return await self._encode(SCENE_ENCODER, images)  # type: ignore[return-value]

    async def encode_products(self, images: np.ndarray) -> ProductOutputs:
        return await self._encode(PRODUCT_ENCODER, images)  # type: ignore[return-value]

    async def _encode(self, model: str, images: np.ndarray) -> tuple[np.ndarray, ...]:
        info = self.info
        images = check_images(images, info.input_size)
        spec = encoder_specs(info)[model]

        async def forward(chunk: np.ndarray) -> tuple[np.ndarray, ...]:
            outputs = await asyncio.to_thread(_run, self._module(model), chunk)
            return check_outputs(outputs, spec, len(chunk), model)

        return await in_chunks(images, self.max_batch, forward)

    def _module(self, model: str) -> torch.jit.ScriptModule:
        module = self._scene if model == SCENE_ENCODER else self._product
        if module is None:
            raise BackendUnavailable("the TorchScript encoders are not loaded (or were closed)")
        return module

    async def ready(self) -> bool:
        return self._scene is not None and self._product is not None

    async def close(self) -> None:
        self._scene = self._product = None


def _run(module: torch.jit.ScriptModule, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """One forward pass; runs in a worker thread (inference mode is per thread, so it is entered here)."""
    if not images.flags.writeable:  # torch.from_numpy wants memory it may write
        images = images.copy()
    with torch.inference_mode():
        outputs = module(torch.from_numpy(images))
    return tuple(t.numpy() for t in outputs)


def _info_from_config(version: str, config: dict[str, Any], backend: str) -> ModelInfo:
    try:
        grid = int(config["grid"])
        return ModelInfo(
            model_version=version,
            input_size=int(config["input_size"]),
            grid=grid,
            regions=grid * grid,
            embedding_dim=int(config["embed_dim"]),
            backend=backend,
            model_config=dict(config),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendUnavailable(f"the exported model config is incomplete ({exc!r}): {config}") from exc
