"""The gRPC servicer of ctl.v1.EncoderService: proto in, one EncoderApp call, proto out.

Domain errors become statuses through `ctl.serving.error_mapper(ERROR_CODES)`; in EncodeProducts a bad
image becomes its own ProductEncoding.error (code name and message) and the other images succeed.
"""

from __future__ import annotations

import json

import grpc

from ctl.serving import error_mapper
from ctl.tensors import product_to_proto, scene_to_proto
from ctl.v1 import embeddings_pb2, encoder_pb2, encoder_pb2_grpc
from encoder_service.app import EncoderApp, ProductResult
from encoder_service.decode import pixel_limit
from encoder_service.errors import ERROR_CODES, status_code

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name  # "ctl.v1.EncoderService"


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    """Thin: every method is one call into EncoderApp."""

    def __init__(self, app: EncoderApp):
        self._app = app

    @error_mapper(ERROR_CODES)
    async def EncodeScene(
        self, request: encoder_pb2.EncodeSceneRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.EncodeSceneResponse:
        scene, version = await self._app.encode_scene(request.image, context.time_remaining())
        return encoder_pb2.EncodeSceneResponse(embedding=scene_to_proto(scene, version))

    @error_mapper(ERROR_CODES)
    async def EncodeProducts(
        self, request: encoder_pb2.EncodeProductsRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.EncodeProductsResponse:
        results, version = await self._app.encode_products(request.images, context.time_remaining())
        return encoder_pb2.EncodeProductsResponse(
            results=[_product_encoding(r, version) for r in results], model_version=version
        )

    @error_mapper(ERROR_CODES)
    async def GetModelInfo(
        self, request: encoder_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.ModelInfo:
        info, config = self._app.model_info(), self._app.config
        return encoder_pb2.ModelInfo(
            model_version=info.model_version,
            input_size=info.input_size,
            grid=info.grid,
            regions=info.regions,
            embedding_dim=info.embedding_dim,
            backend=info.backend,
            max_batch_images=config.max_images_per_call,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=pixel_limit(config.max_image_pixels),
            model_config_json=json.dumps(info.model_config, sort_keys=True),
            max_request_bytes=config.max_message_bytes,
        )


def _product_encoding(result: ProductResult, version: str) -> encoder_pb2.ProductEncoding:
    if result.error is not None:
        error = embeddings_pb2.RecordError(code=status_code(result.error).name, message=str(result.error))
        return encoder_pb2.ProductEncoding(error=error)
    return encoder_pb2.ProductEncoding(embedding=product_to_proto(result.style, result.key, version))
