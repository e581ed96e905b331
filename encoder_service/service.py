"""The gRPC servicer of ctl.v1.EncoderService: proto in, one EncoderApp call, proto out.

Domain errors become statuses through `ctl.serving.error_mapper(ERROR_CODES)`; in EncodeProducts a bad
image becomes its own ProductEncoding.error (code name and message) and the other images succeed.
"""

from __future__ import annotations

import grpc

from ctl.encoding import ProductResult, model_info_to_proto
from ctl.serving import error_mapper
from ctl.tensors import product_to_proto, scene_to_proto
from ctl.v1 import embeddings_pb2, encoder_pb2, encoder_pb2_grpc
from encoder_service.app import EncoderApp
from encoder_service.errors import ERROR_CODES

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
        return model_info_to_proto(self._app.model_info())


def _product_encoding(result: ProductResult, version: str) -> encoder_pb2.ProductEncoding:
    if not result.ok:
        error = embeddings_pb2.RecordError(code=result.code, message=result.message)
        return encoder_pb2.ProductEncoding(error=error)
    return encoder_pb2.ProductEncoding(
        embedding=product_to_proto(result.style, result.attention_key, version)
    )
