"""What the encoder service does, without gRPC: bytes in, embeddings out.

EncoderApp owns the backend, the image-decoding thread pool and one micro-batcher per encoder. The
servicer calls one method per RPC; tests and other callers can use it directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge

from ctl.serving import Metrics
from ctl.tensors import Scene
from encoder_service.backends import EncoderBackend, ModelInfoData
from encoder_service.batcher import MicroBatcher
from encoder_service.config import EncoderConfig
from encoder_service.decode import decode_image
from encoder_service.errors import BackendUnavailable, ImageError, TooManyImages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProductResult:
    """One image's outcome: its vectors, or the error that failed it alone."""

    style: np.ndarray | None = None
    key: np.ndarray | None = None
    error: ImageError | None = None


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

    def _info(self) -> ModelInfoData:
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

    async def encode_scene(self, image: bytes, deadline_s: float | None = None) -> tuple[Scene, str]:
        """A scene's embeddings and the model version; `deadline_s`: what the caller still waits."""
        info = self._info()
        started = time.monotonic()
        pixels = await self.decode(image)
        global_, local, attention = await self.scenes.submit(pixels[None], _left(deadline_s, started))
        return Scene(global_[0], local[0], attention[0]), info.model_version

    async def encode_products(
        self, images: Sequence[bytes], deadline_s: float | None = None
    ) -> tuple[list[ProductResult], str]:
        """One result per image, in order; a bad image fails only its own result. Backend errors and
        too many images fail the call. `deadline_s`: what the caller still waits."""
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
        results = [ProductResult(error=o) if isinstance(o, ImageError) else ProductResult() for o in decoded]
        if good:
            style, key = await self.products.submit(
                np.stack([decoded[i] for i in good]), _left(deadline_s, started)
            )
            for row, i in enumerate(good):
                results[i] = ProductResult(style=style[row], key=key[row])
        return results, info.model_version

    def model_info(self) -> ModelInfoData:
        """The served model; BackendUnavailable until `start()` has finished."""
        return self._info()


def _left(deadline_s: float | None, since: float) -> float | None:
    """What remains of a deadline given at `since` (time.monotonic)."""
    return None if deadline_s is None else deadline_s - (time.monotonic() - since)
