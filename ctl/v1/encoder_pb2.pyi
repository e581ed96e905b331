from ctl.v1 import embeddings_pb2 as _embeddings_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeSceneRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    def __init__(self, image: _Optional[bytes] = ...) -> None: ...

class EncodeSceneResponse(_message.Message):
    __slots__ = ("embedding",)
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    embedding: _embeddings_pb2.SceneEmbedding
    def __init__(self, embedding: _Optional[_Union[_embeddings_pb2.SceneEmbedding, _Mapping]] = ...) -> None: ...

class EncodeProductsRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ProductEncoding(_message.Message):
    __slots__ = ("embedding", "error")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    embedding: _embeddings_pb2.ProductEmbedding
    error: _embeddings_pb2.RecordError
    def __init__(self, embedding: _Optional[_Union[_embeddings_pb2.ProductEmbedding, _Mapping]] = ..., error: _Optional[_Union[_embeddings_pb2.RecordError, _Mapping]] = ...) -> None: ...

class EncodeProductsResponse(_message.Message):
    __slots__ = ("results", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ProductEncoding]
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[ProductEncoding, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "input_size", "grid", "regions", "embedding_dim", "backend", "max_batch_images", "max_image_bytes", "max_image_pixels", "model_config_json", "max_request_bytes")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    input_size: int
    grid: int
    regions: int
    embedding_dim: int
    backend: str
    max_batch_images: int
    max_image_bytes: int
    max_image_pixels: int
    model_config_json: str
    max_request_bytes: int
    def __init__(self, model_version: _Optional[str] = ..., input_size: _Optional[int] = ..., grid: _Optional[int] = ..., regions: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., backend: _Optional[str] = ..., max_batch_images: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., model_config_json: _Optional[str] = ..., max_request_bytes: _Optional[int] = ...) -> None: ...
