"""The ranker's product store: one small interface (`base`), two Qdrant adapters (DESIGN.md §2).

`open_edge_store` opens the embedded default (qdrant-edge, a directory per model version);
`open_client_store` opens a collection on a Qdrant server/cluster (or qdrant-client's local mode).
"""

from __future__ import annotations

from ranker_service.store.base import (
    ATTENTION,
    PRODUCT_NAMESPACE,
    STYLE,
    Condition,
    Hits,
    Listing,
    ProductPoint,
    ProductStore,
    Query,
    point_id,
)
from ranker_service.store.client import QdrantClientStore, open_client_store
from ranker_service.store.edge import EdgeStore, open_edge_store

__all__ = [
    "ATTENTION",
    "PRODUCT_NAMESPACE",
    "STYLE",
    "Condition",
    "EdgeStore",
    "Hits",
    "Listing",
    "ProductPoint",
    "ProductStore",
    "QdrantClientStore",
    "Query",
    "open_client_store",
    "open_edge_store",
    "point_id",
]
