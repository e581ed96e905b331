"""The ranker's client of the encoder service: one channel, deadlines on every call, errors translated.

UNAVAILABLE / DEADLINE_EXCEEDED from the encoder become EncoderUnavailable (the ranker answers
UNAVAILABLE); INVALID_ARGUMENT about an image becomes InvalidRequest with the encoder's message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctl.encoding import ModelInfo, ProductResult, model_info_from_proto
from ctl.errors import TensorError
from ctl.security import Tokens, aio_channel
from ctl.tensors import Scene, product_from_proto, scene_from_proto, unit_rows, unit_scene
from ctl.v1 import encoder_pb2, encoder_pb2_grpc
from ranker_service.errors import (
    EncoderUnavailable,
    InvalidRequest,
    RankerError,
    UnsupportedModel,
    VersionMismatch,
)
from style_model.distances import SERVED_ATTENTION

_UNAVAILABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def _check_servable(msg: encoder_pb2.ModelInfo, address: str) -> None:
    """UnsupportedModel unless the model ranks the way this ranker does (its config's attention, when the
    encoder knows the config: the in-process backend always does, Triton through the exported config)."""
    try:
        config = json.loads(msg.model_config_json) if msg.model_config_json else {}
    except ValueError:
        config = {}
    attention = config.get("attention", SERVED_ATTENTION) if isinstance(config, dict) else SERVED_ATTENTION
    if attention != SERVED_ATTENTION:
        raise UnsupportedModel(
            f"the encoder at {address} serves model {msg.model_version}, trained with "
            f"attention={attention!r}; this ranker ranks with attention={SERVED_ATTENTION!r}, so its answers "
            f"would not be the model's: serve a model trained with --attention {SERVED_ATTENTION}"
        )


class EncoderClient:
    """Async client of ctl.v1.EncoderService; `timeout` caps every call (a caller's deadline may lower it),
    `products_timeout` the EncodeProducts calls of ingestion: batch work that may queue behind a slow model
    (a CPU ResNet-50 is slow, docs/BENCHMARKS.md, and a few streams put hundreds of images in its queue)."""

    def __init__(
        self,
        address: str,
        timeout: float,
        max_message_bytes: int,
        *,
        products_timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | Tokens = "",
    ):
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        self.products_timeout = timeout if products_timeout is None else products_timeout
        self._channel = aio_channel(
            address,
            credentials,
            token,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._stub = encoder_pb2_grpc.EncoderServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.info: ModelInfo | None = None

    def _deadline(self, remaining_s: float | None, cap: float | None = None) -> float:
        cap = self.timeout if cap is None else cap
        return cap if remaining_s is None else max(0.001, min(cap, remaining_s))

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> RankerError:
        code, details = exc.code(), exc.details()
        if code in _UNAVAILABLE:
            return EncoderUnavailable(f"encoder at {self.address} {what}: {code.name}: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(details)
        if code == grpc.StatusCode.FAILED_PRECONDITION:  # the model behind the encoder changed
            return VersionMismatch(f"encoder at {self.address} {what}: {details}")
        return EncoderUnavailable(f"encoder at {self.address} {what}: {code.name}: {details}")

    async def model_info(self, remaining_s: float | None = None) -> ModelInfo:
        try:
            msg = await self._stub.GetModelInfo(
                encoder_pb2.GetModelInfoRequest(), timeout=self._deadline(remaining_s)
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "did not give its model info") from exc
        _check_servable(msg, self.address)
        info = model_info_from_proto(msg)
        # an encoder that does not say how many images a call may carry: its default
        self.info = dataclasses.replace(info, max_batch_images=info.max_batch_images or 32)
        return self.info

    async def serving(self, timeout: float = 1.0) -> bool:
        """The encoder's own health check says SERVING."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def encode_scene(self, image: bytes, remaining_s: float | None = None) -> tuple[Scene, str]:
        try:
            reply = await self._stub.EncodeScene(
                encoder_pb2.EncodeSceneRequest(image=image),
                timeout=self._deadline(remaining_s),
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "could not encode the scene") from exc
        info = self._require_info()
        try:  # unit length by construction, like a precomputed embedding (ctl.tensors.unit_rows)
            scene = unit_scene(
                scene_from_proto(reply.embedding, info.regions, info.embedding_dim), "the scene's embedding"
            )
        except TensorError as exc:
            raise EncoderUnavailable(
                f"encoder at {self.address} answered a malformed embedding: {exc}"
            ) from exc
        return scene, reply.embedding.model_version

    async def encode_products(
        self, images: Sequence[bytes], remaining_s: float | None = None
    ) -> tuple[list[ProductResult], str]:
        try:
            reply = await self._stub.EncodeProducts(
                encoder_pb2.EncodeProductsRequest(images=list(images)),
                timeout=self._deadline(remaining_s, self.products_timeout),
            )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "could not encode products") from exc
        info = self._require_info()
        results = []
        for r in reply.results:
            if r.WhichOneof("result") == "embedding":
                try:
                    style, attention_key = product_from_proto(r.embedding, info.embedding_dim)
                    style = unit_rows(style, "style")
                    attention_key = unit_rows(attention_key, "attention key")
                except TensorError as exc:  # the model broke its contract for this image
                    results.append(
                        ProductResult(code="INTERNAL", message=f"the encoder answered a bad embedding: {exc}")
                    )
                    continue
                results.append(ProductResult(style=style, attention_key=attention_key))
            else:
                results.append(
                    ProductResult(code=r.error.code or "INVALID_ARGUMENT", message=r.error.message)
                )
        if len(results) != len(images):
            raise EncoderUnavailable(
                f"encoder at {self.address} answered {len(results)} results for {len(images)}"
            )
        return results, reply.model_version

    def _require_info(self) -> ModelInfo:
        if self.info is None:
            raise EncoderUnavailable(f"encoder at {self.address} has not given its model info yet")
        return self.info

    async def close(self) -> None:
        await self._channel.close()
