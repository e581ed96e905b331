"""The gRPC servicer of ctl.v1.RankerService: proto in, one RankerApp call, proto out.

Every mapping between the API's messages and the ranker's domain types is here, with the checks whose
messages name the API's fields: a ranking option is a field of retrieval.Ask (and its effect in
retrieval.py) plus its line in `scene_query`. Domain errors become statuses through
`ctl.serving.error_mapper(ERROR_CODES)`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence

import grpc

from ctl.encoding import ModelInfo
from ctl.errors import TensorError
from ctl.serving import error_mapper
from ctl.tensors import F32, Scene, product_from_proto, scene_from_proto, unit_rows, unit_scene
from ctl.v1 import embeddings_pb2, ranker_pb2, ranker_pb2_grpc
from ranker_service.app import CatalogStats, Deleted, Lookup, RankerApp
from ranker_service.bounds import MAX_METADATA_KEY_BYTES, fitting, metadata_value, record_metadata, text
from ranker_service.config import RankerConfig
from ranker_service.errors import ERROR_CODES, InvalidRequest, VersionMismatch
from ranker_service.records import ProductRecord, RefusedRecord, StreamRecord, Upserted
from ranker_service.retrieval import (
    DEFAULT_LIMIT,
    Ask,
    Recommendations,
    Result,
    RetrievalMode,
    SceneQuery,
)
from ranker_service.store.base import Condition, Query

SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name  # "ctl.v1.RankerService"
MAX_DELETE = 10_000  # ids per DeleteProducts
MAX_GET = 10_000  # ids per GetProducts
_MODE_PREFIX = "RETRIEVAL_MODE_"


def mode_to_proto(mode: RetrievalMode) -> ranker_pb2.RetrievalMode.ValueType:
    """The API's value of a mode: the same name (RETRIEVAL_MODE_POOLED for RetrievalMode.POOLED)."""
    return ranker_pb2.RetrievalMode.Value(_MODE_PREFIX + mode.name)


def mode_from_proto(value: int) -> RetrievalMode:
    """The mode of an API value; UNSPECIFIED is the default, pooled. InvalidRequest for a value this
    ranker does not know (a newer client's)."""
    if value == ranker_pb2.RETRIEVAL_MODE_UNSPECIFIED:
        return RetrievalMode.POOLED
    try:
        return RetrievalMode[ranker_pb2.RetrievalMode.Name(value).removeprefix(_MODE_PREFIX)]
    except (ValueError, KeyError):
        raise InvalidRequest(f"mode: unknown value {value}") from None


# --- Recommend --------------------------------------------------------------------------------------------


def scene_query(req: ranker_pb2.RecommendRequest, config: RankerConfig, info: ModelInfo) -> SceneQuery:
    """The call as domain types: one Ask per category, sharing one Query's conditions and exclusions (built
    once per call). Every list is bounded, since each filter condition costs a check per product of the
    category in the engine, which holds the GIL (and so the health checks) for the whole call."""
    if not req.categories:
        raise InvalidRequest("categories: give at least one category")
    if len(req.categories) > config.max_categories:
        raise InvalidRequest(
            f"categories: at most {config.max_categories} per call, got {len(req.categories)}"
        )
    if len(set(req.categories)) != len(req.categories):
        raise InvalidRequest("categories: each category at most once")
    for c in req.categories:
        text(c, "category")
    limit = req.limit or DEFAULT_LIMIT
    if limit > config.max_limit:
        raise InvalidRequest(f"limit: must be 1..{config.max_limit}, got {limit}")
    if req.pool_size > config.max_pool:
        raise InvalidRequest(f"pool_size: must be at most {config.max_pool}, got {req.pool_size}")
    if req.pool_size and req.pool_size < limit:
        raise InvalidRequest(f"pool_size: must be at least limit ({limit}), got {req.pool_size}")
    mode = mode_from_proto(req.mode)
    if math.isnan(req.max_distance) or req.max_distance < 0:
        raise InvalidRequest(
            f"max_distance: must be 0 (no cut) or a positive hybrid distance, got {req.max_distance}"
        )
    conditions = _conditions(req.filters, config)
    if len(req.exclude_product_ids) > config.max_exclude:
        raise InvalidRequest(
            f"exclude_product_ids: at most {config.max_exclude} per call, got {len(req.exclude_product_ids)}"
        )
    exclude = tuple(dict.fromkeys(text(p, "exclude_product_ids[]") for p in req.exclude_product_ids))
    asks = tuple(
        Ask(
            Query(c, conditions, exclude),
            limit=limit,
            mode=mode,
            pool=req.pool_size,
            max_distance=req.max_distance,
        )
        for c in req.categories
    )
    return SceneQuery(_scene(req, info), asks)


def _conditions(
    filters: Sequence[ranker_pb2.MetadataCondition], config: RankerConfig
) -> tuple[Condition, ...]:
    if len(filters) > config.max_filters:
        raise InvalidRequest(
            f"filters: at most {config.max_filters} per call, got {len(filters)} "
            "(combine values of one key into one filter's any_of / none_of)"
        )
    values_bytes = sum(len(v.encode()) for f in filters for v in (*f.any_of, *f.none_of))
    if values_bytes > config.max_filter_bytes:
        raise InvalidRequest(
            f"filters: at most {config.max_filter_bytes:,} bytes of values per call, got {values_bytes:,}"
        )
    conditions = []
    for i, f in enumerate(filters):
        text(f.key, f"filters[{i}].key", MAX_METADATA_KEY_BYTES)
        if not f.any_of and not f.none_of:
            raise InvalidRequest(f"filters[{i}] ({f.key!r}): give any_of or none_of values")
        values = len(f.any_of) + len(f.none_of)
        if values > config.max_filter_values:
            raise InvalidRequest(
                f"filters[{i}] ({f.key!r}): at most {config.max_filter_values} any_of + none_of values, "
                f"got {values}"
            )
        any_of = tuple(dict.fromkeys(metadata_value(v, f"filters[{i}].any_of[]", config) for v in f.any_of))
        none_of = tuple(
            dict.fromkeys(metadata_value(v, f"filters[{i}].none_of[]", config) for v in f.none_of)
        )
        conditions.append(Condition(f.key, any_of, none_of))
    return tuple(conditions)


def _scene(req: ranker_pb2.RecommendRequest, info: ModelInfo) -> bytes | Scene:
    """The image's bytes, or the precomputed embedding: of the served model, its shape, made unit length."""
    which = req.WhichOneof("scene")
    if which is None:
        raise InvalidRequest("give the scene: scene_image (encoded image bytes) or scene_embedding")
    if which == "scene_image":
        if not req.scene_image:
            raise InvalidRequest("scene_image is empty")
        return req.scene_image
    emb = req.scene_embedding
    if not emb.model_version:
        raise InvalidRequest("scene_embedding.model_version is empty: say which model made it")
    if emb.model_version != info.model_version:
        raise VersionMismatch(
            f"scene_embedding was made by model {emb.model_version}; this ranker serves {info.model_version}"
        )
    return unit_scene(scene_from_proto(emb, info.regions, info.embedding_dim))


def recommend_response(answer: Recommendations, explain: bool) -> ranker_pb2.RecommendResponse:
    return ranker_pb2.RecommendResponse(
        results=[_category_proto(r, explain) for r in answer.results],
        model_version=answer.model_version,
        grid=answer.grid,
    )


def _category_proto(r: Result, explain: bool) -> ranker_pb2.CategoryRecommendations:
    products = []
    for i, p in enumerate(r.products):
        rec = ranker_pb2.Recommendation(
            product_id=p.product_id,
            category=p.category,
            distance=float(r.ranked.distance[i]),
            metadata=p.metadata,
        )
        if explain:
            rec.global_distance = float(r.ranked.global_[i])
            rec.local_distance = float(r.ranked.local[i])
            rec.attention.extend(r.ranked.attention[i].tolist())
        products.append(rec)
    return ranker_pb2.CategoryRecommendations(
        category=r.category,
        products=products,
        candidates_scored=r.candidates_scored,
        category_size=r.category_size,
        certified=r.certified,
        mode=mode_to_proto(r.mode),
    )


# --- UpsertProducts ---------------------------------------------------------------------------------------


async def stream_records(
    requests: AsyncIterator[ranker_pb2.UpsertProductsRequest], app: RankerApp
) -> AsyncIterator[StreamRecord]:
    """The stream's records as the app reads them: each request is read and mapped only when the app asks
    for the next record, so the stream's back-pressure and the app's byte budget hold."""
    info = app.model_info  # at the app's first read, after its own checks (open streams, readiness)
    async for request in requests:
        yield stream_record(request.product, app.config, info)


def stream_record(product: ranker_pb2.Product, config: RankerConfig, info: ModelInfo) -> StreamRecord:
    """The product as a domain record, or refused (it then fails alone, at its place in the stream): ids and
    metadata bounded, an image or a precomputed embedding of the served model, made unit length."""
    try:
        return _product_record(product, config, info)
    except (InvalidRequest, TensorError) as exc:
        return RefusedRecord(product.product_id, "INVALID_ARGUMENT", str(exc))
    except VersionMismatch as exc:
        return RefusedRecord(product.product_id, "FAILED_PRECONDITION", str(exc))


def _product_record(product: ranker_pb2.Product, config: RankerConfig, info: ModelInfo) -> ProductRecord:
    product_id = text(product.product_id, "product_id")
    category = text(product.category, "category")
    metadata = record_metadata(product.metadata, config)
    content = product.WhichOneof("content")
    if content is None:
        raise InvalidRequest("give the product's image or its embedding")
    size = product.ByteSize()
    if content == "image":
        image = product.image  # (each read of the field copies it)
        if not image:
            raise InvalidRequest("image is empty")
        return ProductRecord(product_id, category, metadata, size, image=image)
    embedding = _embedding(product.embedding, info)
    return ProductRecord(product_id, category, metadata, size, embedding=embedding)


def _embedding(emb: embeddings_pb2.ProductEmbedding, info: ModelInfo) -> tuple[F32, F32]:
    if not emb.model_version:
        raise InvalidRequest("embedding.model_version is empty: say which model made it")
    if emb.model_version != info.model_version:
        raise VersionMismatch(
            f"embedding made by model {emb.model_version}; this catalog holds {info.model_version}"
        )
    style, attention_key = product_from_proto(emb, info.embedding_dim)
    return unit_rows(style, "embedding.style"), unit_rows(attention_key, "embedding.attention_key")


def upsert_response(outcome: Upserted) -> ranker_pb2.UpsertProductsResponse:
    return ranker_pb2.UpsertProductsResponse(
        received=outcome.received,
        upserted=outcome.upserted,
        failures=[
            ranker_pb2.RecordFailure(
                index=f.index,
                product_id=f.product_id,
                error=embeddings_pb2.RecordError(code=f.code, message=f.message),
            )
            for f in outcome.failures
        ],
        model_version=outcome.model_version,
    )


# --- DeleteProducts, GetProducts, GetCatalogStats --------------------------------------------------------


def product_ids(ids: Sequence[str], limit: int) -> list[str]:
    """A request's product ids, each checked and once, in order; 1 to `limit` of them."""
    if not ids:
        raise InvalidRequest("product_ids: give at least one id")
    if len(ids) > limit:
        raise InvalidRequest(f"product_ids: at most {limit} per call, got {len(ids)}")
    return list(dict.fromkeys(text(p, "product_ids[]") for p in ids))


def delete_response(deleted: Deleted) -> ranker_pb2.DeleteProductsResponse:
    return ranker_pb2.DeleteProductsResponse(deleted=deleted.deleted, not_found=deleted.not_found)


def get_products_response(lookup: Lookup) -> ranker_pb2.GetProductsResponse:
    return ranker_pb2.GetProductsResponse(
        products=[
            ranker_pb2.StoredProduct(product_id=p.product_id, category=p.category, metadata=p.metadata)
            for p in lookup.products
        ],
        not_found=lookup.not_found,
    )


def stats_response(stats: CatalogStats) -> ranker_pb2.CatalogStats:
    return ranker_pb2.CatalogStats(
        total_products=stats.total_products,
        products_by_category=stats.products_by_category,
        model_version=stats.model_version,
        store=stats.store,
    )


class RankerServicer(ranker_pb2_grpc.RankerServiceServicer):
    """Thin: every RPC is its proto-level method (usable in process, without gRPC's context) under the
    error mapping; each of those converts, makes one RankerApp call and converts back."""

    def __init__(self, app: RankerApp):
        self.app = app

    # --- proto in, proto out ---------------------------------------------------------------------------

    async def recommend(
        self, request: ranker_pb2.RecommendRequest, remaining_s: float | None
    ) -> ranker_pb2.RecommendResponse:
        app = self.app
        query = scene_query(request, app.config, app.model_info)
        reply = recommend_response(await app.recommend(query, remaining_s), request.explain)
        return fitting(reply, app.config, "the products found", "ask for a smaller limit or fewer categories")

    async def upsert(
        self, requests: AsyncIterator[ranker_pb2.UpsertProductsRequest], remaining_s: float | None
    ) -> ranker_pb2.UpsertProductsResponse:
        app = self.app
        outcome = await app.upsert(stream_records(requests, app), remaining_s)
        return fitting(
            upsert_response(outcome),
            app.config,
            f"the {len(outcome.failures):,} failures of this stream",
            "send fewer records per stream",
        )

    async def delete(self, request: ranker_pb2.DeleteProductsRequest) -> ranker_pb2.DeleteProductsResponse:
        self.app.model_info  # noqa: B018  (not ready: UNAVAILABLE before the request is looked at)
        return delete_response(await self.app.delete(product_ids(request.product_ids, MAX_DELETE)))

    async def get_products(self, request: ranker_pb2.GetProductsRequest) -> ranker_pb2.GetProductsResponse:
        self.app.model_info  # noqa: B018  (not ready: UNAVAILABLE before the request is looked at)
        ids = product_ids(request.product_ids, MAX_GET)
        reply = get_products_response(await self.app.get_products(ids))
        return fitting(
            reply, self.app.config, f"the {len(ids):,} products asked for", "ask for fewer ids per call"
        )

    async def stats(self) -> ranker_pb2.CatalogStats:
        return stats_response(await self.app.stats())

    # --- the RPCs ----------------------------------------------------------------------------------------

    @error_mapper(ERROR_CODES)
    async def Recommend(self, request, context: grpc.aio.ServicerContext):
        return await self.recommend(request, context.time_remaining())

    @error_mapper(ERROR_CODES)
    async def UpsertProducts(self, request_iterator, context: grpc.aio.ServicerContext):
        return await self.upsert(request_iterator, context.time_remaining())

    @error_mapper(ERROR_CODES)
    async def DeleteProducts(self, request, context: grpc.aio.ServicerContext):
        return await self.delete(request)

    @error_mapper(ERROR_CODES)
    async def GetProducts(self, request, context: grpc.aio.ServicerContext):
        return await self.get_products(request)

    @error_mapper(ERROR_CODES)
    async def GetCatalogStats(self, request, context: grpc.aio.ServicerContext):
        return await self.stats()
