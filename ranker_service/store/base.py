"""The product store interface: what the ranker needs from Qdrant, and nothing more (DESIGN.md §2).

One point per product. Point id = uuid5(PRODUCT_NAMESPACE, product_id), so upserting a product again
replaces it. Named vectors: `style` (f_p, HNSW-indexed, dot product) and `attention` (c_p, stored, not
indexed). Payload: `product_id`, `category` (keyword index), `metadata` (dict of str -> str) and
`model_version`. Adapters: `EdgeStore` (qdrant-edge-py, embedded, the default) and `QdrantClientStore`
(qdrant-client: a server/cluster by URL, or its local mode in tests). Both pass tests/test_store.py.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

PRODUCT_NAMESPACE = uuid.UUID("5f1d3c1e-8a1b-4a0e-9d3a-6c7b1e2f4a10")
STYLE = "style"
ATTENTION = "attention"


def point_id(product_id: str) -> str:
    """The Qdrant point id of a product: stable across processes and adapters (idempotent upserts)."""
    return str(uuid.uuid5(PRODUCT_NAMESPACE, product_id))


@dataclass(frozen=True)
class ProductPoint:
    """One product as stored: its two unit vectors [D] (float32) and its payload."""

    product_id: str
    category: str
    style: NDArray[np.float32]
    attention_key: NDArray[np.float32]
    metadata: Mapping[str, str] = field(default_factory=dict)
    model_version: str = ""


@dataclass(frozen=True)
class Listing:
    """One stored product without its vectors: what it is, not how it looks."""

    product_id: str
    category: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    """A metadata filter: metadata[key] must be one of `any_of` (if given) and none of `none_of`."""

    key: str
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()


@dataclass(frozen=True)
class Query:
    """Where to look: one category, optional metadata conditions (all must hold), ids to leave out."""

    category: str
    conditions: tuple[Condition, ...] = ()
    exclude_ids: tuple[str, ...] = ()  # product ids


@dataclass(frozen=True)
class Hits:
    """What one vector query returned, best first: product ids, `scores` [n] (dot product of the query with
    `style`), the vectors stacked, `styles` and `attention_keys` [n, D], and the products (row i of each =
    the i-th hit). The ranker scores the stacked vectors and builds ProductPoints for the few it keeps, so
    `points` may make them on access (the embedded store's do)."""

    ids: list[str]
    scores: NDArray[np.float32]
    styles: NDArray[np.float32]
    attention_keys: NDArray[np.float32]
    points: Sequence[ProductPoint]

    def __len__(self) -> int:
        return len(self.ids)


class ProductStore(ABC):
    """Async interface; adapters run blocking engine calls off the event loop where that helps.

    A store is opened for one model version and dimension (`model_version`, `dim`). It records them
    when it is created; opening an existing store made by another version raises VersionMismatch
    (a new model means a new collection / directory, DESIGN.md §2).
    """

    model_version: str
    embedding_dim: int
    description: str  # for logs and GetCatalogStats, e.g. "embedded qdrant-edge at /var/lib/ctl/store"
    # Calls run on the caller's thread and never wait (an embedded engine): running several at once gains
    # nothing, and only delays everything else the event loop has to do (health checks) by all of them.
    inline: bool = False

    @abstractmethod
    async def upsert(self, points: Sequence[ProductPoint]) -> None:
        """Insert or replace products (by product id); durable when it returns."""

    @abstractmethod
    async def search(
        self, vectors: NDArray[np.float32], query: Query, limit: int, *, exact: bool = False
    ) -> list[Hits]:
        """Top `limit` products by dot(vector, style) for each row of `vectors` [Q, D], best first.

        One batched call. `exact=True` asks the engine for brute force (no HNSW) so that the returned
        scores are the true top `limit` (used to certify answers). Hits carry both vectors.
        """

    @abstractmethod
    async def scroll(
        self, query: Query, limit: int, offset: str | None = None
    ) -> tuple[list[ProductPoint], str | None]:
        """A page of the products matching `query` (with vectors), and the offset of the next page or None."""

    @abstractmethod
    async def retrieve(self, product_ids: Sequence[str]) -> list[ProductPoint]:
        """The stored products among `product_ids` (missing ones are left out), with vectors."""

    @abstractmethod
    async def lookup(self, product_ids: Sequence[str]) -> list[Listing]:
        """The stored products among `product_ids` without their vectors (presence checks, listings):
        in the order asked, each once; missing ones are left out."""

    @abstractmethod
    async def delete(self, product_ids: Sequence[str]) -> None:
        """Remove these products; unknown ids are ignored."""

    @abstractmethod
    async def count(self, where: Query | str | None = None, *, exact: bool = True) -> int:
        """Number of products: all (None), of one category (a str), or matching a Query (its category,
        conditions and exclusions). `exact=False` allows the engine's estimate where counting is costly
        (a filter on unindexed metadata scans the category)."""

    @abstractmethod
    async def counts_by_category(self) -> dict[str, int]:
        """Exact number of products per category."""

    @abstractmethod
    async def optimize(self) -> None:
        """Build indexes after a bulk load (HNSW); a no-op where the engine does it by itself."""

    @abstractmethod
    async def check(self) -> None:
        """Raise StoreError unless the store can serve now (health probes call it: cheap, no scan)."""

    @abstractmethod
    async def close(self) -> None:
        """Flush and release the store; later calls raise StoreClosed. Calling it twice is fine."""
