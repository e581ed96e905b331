"""What the encoder service does, without gRPC: bytes in, embeddings out.

EncoderApp owns the backend, the image-decoding thread pool and one micro-batcher per encoder. The
servicer calls one method per RPC; tests and other callers can use it directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import Gauge

from ctl.encoding import ModelInfo, ProductResult
from ctl.serving import Metrics
from ctl.tensors import Scene
from encoder_service.backends.base import EncoderBackend
from encoder_service.batcher import MicroBatcher
from encoder_service.config import EncoderConfig
from encoder_service.decode import decode_image, pixel_limit
from encoder_service.errors import BackendUnavailable, ImageError, TooManyImages, status_code

log = logging.getLogger(__name__)


class EncoderApp:
    """Backend + decoding + batching. `start()` loads the model and proves it with a warm-up pass."""

    def __init__(self, config: EncoderConfig, backend: EncoderBackend, metrics: Metrics):
        self.config = config
        self.backend = backend
        self.metrics = metrics
        batch_images = metrics.histogram(
            "ctl_encoder_batch_images", "images per forward pass, by encoder", ["encoder"]
        )
        passes = metrics.counter("ctl_encoder_forward_passes", "forward passes run, by encoder", ["encoder"])
        rejected = metrics.counter(
            "ctl_encoder_rejected_images",
            "images refused because the queue was full, by encoder",
            ["encoder"],
        )
        common = {
            "max_batch": config.max_batch,
            "max_wait_s": config.max_wait_ms / 1000,
            "max_queue": config.max_queue,
            "workers": config.forward_workers,
        }
        self.scenes = MicroBatcher(
            "scene",
            backend.encode_scenes,
            batch_images=batch_images.labels("scene"),
            passes=passes.labels("scene"),
            rejected=rejected.labels("scene"),
            **common,
        )
        self.products = MicroBatcher(
            "product",
            backend.encode_products,
            batch_images=batch_images.labels("product"),
            passes=passes.labels("product"),
            rejected=rejected.labels("product"),
            **common,
        )
        queued = Gauge(
            "ctl_encoder_queue_images",
            "images admitted and waiting for a forward pass, by encoder (back to 0 when idle)",
            ["encoder"],
            registry=metrics.registry,
        )
        for batcher in (self.scenes, self.products):
            queued.labels(batcher.name).set_function(lambda b=batcher: b.pending_images)
        self._pool: ThreadPoolExecutor | None = None
        self._started = False

    async def start(self) -> None:
        """Loads the backend, runs one forward pass of a blank image through each encoder (so the first
        real call pays no warm-up and a broken backend fails here, not later), then starts batching."""
        await self.backend.start()
        info = self.backend.info
        blank = np.zeros((1, info.input_size, info.input_size, 3), dtype=np.uint8)
        try:
            await self.backend.encode_scenes(blank)
            await self.backend.encode_products(blank)
        except BackendUnavailable:
            raise
        except Exception as exc:
            raise BackendUnavailable(f"the warm-up forward pass failed: {type(exc).__name__}: {exc}") from exc
        self._pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        self.scenes.start()
        self.products.start()
        self._started = True
        log.info(
            "encoder ready: model %s on %s, batches of up to %d images",
            info.model_version,
            info.backend,
            self.config.max_batch,
        )

    async def close(self) -> None:
        self._started = False
        await self.scenes.close()
        await self.products.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        await self.backend.close()

    def _info(self) -> ModelInfo:
        if not self._started:
            raise BackendUnavailable("the encoder is starting: the model is not loaded yet")
        return self.backend.info

    async def decode(self, data: bytes) -> np.ndarray:
        """uint8 [S, S, 3] of one encoded image, decoded in the thread pool (never on the event loop)."""
        info = self._info()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool,
            decode_image,
            data,
            info.input_size,
            self.config.max_image_bytes,
            self.config.max_image_pixels,
        )

    async def encode_scene(self, image: bytes, remaining_s: float | None = None) -> tuple[Scene, str]:
        """A scene's embeddings and the model version; `remaining_s`: what the caller still waits."""
        info = self._info()
        started = time.monotonic()
        pixels = await self.decode(image)
        global_, local, attention = await self.scenes.submit(pixels[None], _left(remaining_s, started))
        return Scene(global_[0], local[0], attention[0]), info.model_version

    async def encode_products(
        self, images: Sequence[bytes], remaining_s: float | None = None
    ) -> tuple[list[ProductResult], str]:
        """One result per image, in order; a bad image fails only its own result (its `code` the gRPC
        status name of its error). Backend errors and too many images fail the call. `remaining_s`: what
        the caller still waits."""
        info = self._info()
        started = time.monotonic()
        limit = self.config.max_images_per_call
        if len(images) > limit:
            raise TooManyImages(
                f"{len(images)} images in one EncodeProducts call; at most {limit} are accepted "
                "(ModelInfo.max_batch_images): split the call"
            )
        decoded = await asyncio.gather(*(self.decode(data) for data in images), return_exceptions=True)
        for outcome in decoded:
            if isinstance(outcome, BaseException) and not isinstance(outcome, ImageError):
                raise outcome
        good = [i for i, outcome in enumerate(decoded) if not isinstance(outcome, BaseException)]
        results = [_failed(o) if isinstance(o, ImageError) else ProductResult() for o in decoded]
        if good:
            styles, attention_keys = await self.products.submit(
                np.stack([decoded[i] for i in good]), _left(remaining_s, started)
            )
            for row, i in enumerate(good):
                results[i] = ProductResult(style=styles[row], attention_key=attention_keys[row])
        return results, info.model_version

    def model_info(self) -> ModelInfo:
        """The served model and this encoder's limits; BackendUnavailable until `start()` has finished."""
        config = self.config
        return dataclasses.replace(
            self._info(),
            max_batch_images=config.max_images_per_call,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=pixel_limit(config.max_image_pixels),
            max_request_bytes=config.max_message_bytes,
        )


def _failed(error: ImageError) -> ProductResult:
    """The result of an image that failed alone: the gRPC status name of its error, and its message."""
    return ProductResult(code=status_code(error).name, message=str(error))


def _left(remaining_s: float | None, since: float) -> float | None:
    """What remains at this moment of `remaining_s` seconds counted from `since` (time.monotonic)."""
    return None if remaining_s is None else remaining_s - (time.monotonic() - since)
