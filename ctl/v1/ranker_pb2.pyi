from ctl.v1 import embeddings_pb2 as _embeddings_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrievalMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_MODE_UNSPECIFIED: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_POOLED: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_EXHAUSTIVE: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_CERTIFY: _ClassVar[RetrievalMode]
RETRIEVAL_MODE_UNSPECIFIED: RetrievalMode
RETRIEVAL_MODE_POOLED: RetrievalMode
RETRIEVAL_MODE_EXHAUSTIVE: RetrievalMode
RETRIEVAL_MODE_CERTIFY: RetrievalMode

class MetadataCondition(_message.Message):
    __slots__ = ("key", "any_of", "none_of")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    NONE_OF_FIELD_NUMBER: _ClassVar[int]
    key: str
    any_of: _containers.RepeatedScalarFieldContainer[str]
    none_of: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., any_of: _Optional[_Iterable[str]] = ..., none_of: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("scene_image", "scene_embedding", "categories", "limit", "exclude_product_ids", "filters", "explain", "mode", "pool_size", "max_distance")
    SCENE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCENE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    scene_image: bytes
    scene_embedding: _embeddings_pb2.SceneEmbedding
    categories: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    exclude_product_ids: _containers.RepeatedScalarFieldContainer[str]
    filters: _containers.RepeatedCompositeFieldContainer[MetadataCondition]
    explain: bool
    mode: RetrievalMode
    pool_size: int
    max_distance: float
    def __init__(self, scene_image: _Optional[bytes] = ..., scene_embedding: _Optional[_Union[_embeddings_pb2.SceneEmbedding, _Mapping]] = ..., categories: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., exclude_product_ids: _Optional[_Iterable[str]] = ..., filters: _Optional[_Iterable[_Union[MetadataCondition, _Mapping]]] = ..., explain: _Optional[bool] = ..., mode: _Optional[_Union[RetrievalMode, str]] = ..., pool_size: _Optional[int] = ..., max_distance: _Optional[float] = ...) -> None: ...

class Recommendation(_message.Message):
    __slots__ = ("product_id", "category", "distance", "metadata", "global_distance", "local_distance", "attention")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    category: str
    distance: float
    metadata: _containers.ScalarMap[str, str]
    global_distance: float
    local_distance: float
    attention: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, product_id: _Optional[str] = ..., category: _Optional[str] = ..., distance: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., global_distance: _Optional[float] = ..., local_distance: _Optional[float] = ..., attention: _Optional[_Iterable[float]] = ...) -> None: ...

class CategoryRecommendations(_message.Message):
    __slots__ = ("category", "products", "candidates_scored", "category_size", "certified", "mode")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_SCORED_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    CERTIFIED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    category: str
    products: _containers.RepeatedCompositeFieldContainer[Recommendation]
    candidates_scored: int
    category_size: int
    certified: bool
    mode: RetrievalMode
    def __init__(self, category: _Optional[str] = ..., products: _Optional[_Iterable[_Union[Recommendation, _Mapping]]] = ..., candidates_scored: _Optional[int] = ..., category_size: _Optional[int] = ..., certified: _Optional[bool] = ..., mode: _Optional[_Union[RetrievalMode, str]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("results", "model_version", "grid")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CategoryRecommendations]
    model_version: str
    grid: int
    def __init__(self, results: _Optional[_Iterable[_Union[CategoryRecommendations, _Mapping]]] = ..., model_version: _Optional[str] = ..., grid: _Optional[int] = ...) -> None: ...

class Product(_message.Message):
    __slots__ = ("product_id", "category", "metadata", "image", "embedding")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    category: str
    metadata: _containers.ScalarMap[str, str]
    image: bytes
    embedding: _embeddings_pb2.ProductEmbedding
    def __init__(self, product_id: _Optional[str] = ..., category: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., image: _Optional[bytes] = ..., embedding: _Optional[_Union[_embeddings_pb2.ProductEmbedding, _Mapping]] = ...) -> None: ...

class UpsertProductsRequest(_message.Message):
    __slots__ = ("product",)
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    product: Product
    def __init__(self, product: _Optional[_Union[Product, _Mapping]] = ...) -> None: ...

class RecordFailure(_message.Message):
    __slots__ = ("index", "product_id", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    product_id: str
    error: _embeddings_pb2.RecordError
    def __init__(self, index: _Optional[int] = ..., product_id: _Optional[str] = ..., error: _Optional[_Union[_embeddings_pb2.RecordError, _Mapping]] = ...) -> None: ...

class UpsertProductsResponse(_message.Message):
    __slots__ = ("received", "upserted", "failures", "model_version")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    received: int
    upserted: int
    failures: _containers.RepeatedCompositeFieldContainer[RecordFailure]
    model_version: str
    def __init__(self, received: _Optional[int] = ..., upserted: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[RecordFailure, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class DeleteProductsRequest(_message.Message):
    __slots__ = ("product_ids",)
    PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    product_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, product_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteProductsResponse(_message.Message):
    __slots__ = ("deleted", "not_found")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class GetProductsRequest(_message.Message):
    __slots__ = ("product_ids",)
    PRODUCT_IDS_FIELD_NUMBER: _ClassVar[int]
    product_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, product_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StoredProduct(_message.Message):
    __slots__ = ("product_id", "category", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    category: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, product_id: _Optional[str] = ..., category: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetProductsResponse(_message.Message):
    __slots__ = ("products", "not_found")
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    products: _containers.RepeatedCompositeFieldContainer[StoredProduct]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, products: _Optional[_Iterable[_Union[StoredProduct, _Mapping]]] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class GetCatalogStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CatalogStats(_message.Message):
    __slots__ = ("total_products", "products_by_category", "model_version", "store")
    class ProductsByCategoryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOTAL_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_BY_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    total_products: int
    products_by_category: _containers.ScalarMap[str, int]
    model_version: str
    store: str
    def __init__(self, total_products: _Optional[int] = ..., products_by_category: _Optional[_Mapping[str, int]] = ..., model_version: _Optional[str] = ..., store: _Optional[str] = ...) -> None: ...
