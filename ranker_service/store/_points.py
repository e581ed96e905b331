"""What the store adapters (`edge`, `client`) do the same way, whatever the engine (DESIGN.md §2).

A ProductPoint to and from a stored point (named vectors + payload), the checks on vectors, limits and
scroll offsets, the payload path of a metadata key, and the frame of error translation. What belongs to one
engine (its filter and point types, its calls, its error messages) stays in its adapter.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ranker_service.errors import InvalidRequest, RankerError, StoreError, VersionMismatch
from ranker_service.store.base import ATTENTION, STYLE, Condition, Hits, ProductPoint, point_id

FACET_START = 1024  # facet hits asked for first; doubled while the answer is full


def check_model(model_version: str, embedding_dim: int) -> None:
    """ValueError unless a store is opened for a named model version and a positive dimension."""
    if not model_version:
        raise ValueError("model_version must be a non-empty string")
    if embedding_dim < 1:
        raise ValueError(f"dim must be positive, got {embedding_dim}")


@contextmanager
def map_errors(translate: Callable[[Exception], RankerError]) -> Iterator[None]:
    """Let RankerErrors through; raise any other Exception as `translate(exc)`, with `exc` as its cause."""
    try:
        yield
    except RankerError:
        raise
    except Exception as exc:
        raise translate(exc) from exc


# Metadata filters match this indexed keyword list (one digest per entry), not the metadata object: a
# condition on an unindexed payload path costs ~1 µs per product of the category in an engine call that
# holds the GIL (1,000 conditions over 100k products froze the ranker for a minute); on the index, a few ms.
# Digests, not the entries themselves: 32 characters whatever the value (a 4 KiB value of control
# characters would be 24 KiB of JSON in the index). Every product written by this code holds MARKER too,
# so a product without it was written by an older ranker and is given its digests when a store opens.
METADATA_TERMS = "metadata_digests"
MARKER = "*"
UNIT_STORED = 1e-5  # a vector further than this from unit length is normalised before it is stored


def vector(values: Any, embedding_dim: int, what: str) -> list[float]:
    """A float32 copy of one vector as a list, of unit length (the caller's array is never modified): the
    ranker's distances and certificate need unit vectors, whoever writes to the store (the ranker's API
    accepts and normalises near-unit ones; this keeps the store's own promise for every writer)."""
    array = np.asarray(values, dtype=np.float32)
    if array.shape != (embedding_dim,):
        raise InvalidRequest(f"{what} has shape {array.shape}, expected ({embedding_dim},)")
    if not np.isfinite(array).all():
        raise InvalidRequest(f"{what} has non-finite values")
    norm = float(np.linalg.norm(array.astype(np.float64)))
    if norm == 0.0:
        raise InvalidRequest(f"{what} is a zero vector")
    if abs(norm - 1.0) > UNIT_STORED:
        array = (array.astype(np.float64) / norm).astype(np.float32)
    return array.tolist()


def stored_fields(
    point: ProductPoint, model_version: str, embedding_dim: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The named vectors and the payload that store `point` in a store of `model_version` and
    `embedding_dim`.

    VersionMismatch if the point was encoded by another model (an empty version passes, and is stored as
    the store's); InvalidRequest if a vector has another shape or non-finite values.
    """
    if point.model_version and point.model_version != model_version:
        raise VersionMismatch(
            f"product {point.product_id!r} was encoded by model {point.model_version!r}, "
            f"but this store holds model {model_version!r}"
        )
    vectors: dict[str, Any] = {
        STYLE: vector(point.style, embedding_dim, f"style vector of {point.product_id!r}"),
        ATTENTION: vector(point.attention_key, embedding_dim, f"attention vector of {point.product_id!r}"),
    }
    payload = {
        "product_id": point.product_id,
        "category": point.category,
        "metadata": {str(k): str(v) for k, v in point.metadata.items()},
        METADATA_TERMS: metadata_terms(point.metadata),
        "model_version": model_version,
    }
    return vectors, payload


def stored_points(
    points: Sequence[ProductPoint], model_version: str, embedding_dim: int
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(point id, named vectors, payload) of each product to upsert; a product listed twice: its last."""
    latest = {point_id(p.product_id): p for p in points}
    return [(pid, *stored_fields(p, model_version, embedding_dim)) for pid, p in latest.items()]


def products(records: Sequence[tuple[Any, Any]], engine: str) -> list[ProductPoint]:
    """Stored points (named vectors, payload) back as ProductPoints."""
    return hits([0.0] * len(records), records, engine).points


def hits(scores: Sequence[float], records: Sequence[tuple[Any, Any]], engine: str) -> Hits:
    """Scored stored points (named vectors, payload) as Hits. The engines hand vectors over as Python lists:
    they become one [N, 2, D] array in a single conversion (a conversion per vector is most of a search's
    time), and each point's vectors are views of it."""
    for vectors, payload in records:
        if not isinstance(vectors, Mapping) or payload is None:
            raise StoreError(f"{engine} returned a point without its named vectors or payload")
    if not records:
        empty = np.zeros((0, 0), dtype=np.float32)
        return Hits([], np.zeros(0, dtype=np.float32), empty, empty, [])
    arrays = np.asarray([(v[STYLE], v[ATTENTION]) for v, _ in records], dtype=np.float32)
    styles, attention_keys = arrays[:, 0], arrays[:, 1]
    points = [
        ProductPoint(
            product_id=payload["product_id"],
            category=payload["category"],
            style=styles[i],
            attention_key=attention_keys[i],
            metadata=dict(payload.get("metadata") or {}),
            model_version=payload.get("model_version", ""),
        )
        for i, (_, payload) in enumerate(records)
    ]
    scored = np.asarray(scores, dtype=np.float32)
    return Hits([p.product_id for p in points], scored, styles, attention_keys, points)


@functools.lru_cache(maxsize=8)
def excluded_point_ids(exclude_ids: tuple[str, ...]) -> tuple[str, ...]:
    """The point ids of a query's exclusions, made once per Recommend rather than once per category and
    store call (uuid5 costs ~5 µs an id: 10,000 exclusions over 32 categories took seconds). The cache is
    small: a call's queries share one tuple, and long lists rarely repeat across calls."""
    return tuple(point_ids(exclude_ids))


def point_ids(product_ids: Sequence[str]) -> list[str]:
    """The point ids of `product_ids`, each once, in the order asked."""
    return list(dict.fromkeys(point_id(p) for p in product_ids))


def in_order(ids: Sequence[str], found: Mapping[str, ProductPoint]) -> list[ProductPoint]:
    """The products found, in the order of `ids` (point ids); those not found are left out."""
    return [found[i] for i in ids if i in found]


def check_limit(limit: int) -> None:
    """InvalidRequest unless at least one result is asked for."""
    if limit < 1:
        raise InvalidRequest(f"limit must be at least 1, got {limit}")


def query_rows(vectors: NDArray[np.float32], embedding_dim: int, limit: int) -> NDArray[np.float32]:
    """A search's query vectors as float32 rows [Q, D], once their shape, values and `limit` are checked."""
    rows = np.asarray(vectors, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != embedding_dim:
        raise InvalidRequest(f"query vectors have shape {rows.shape}, expected (Q, {embedding_dim})")
    check_limit(limit)
    if not np.isfinite(rows).all():
        raise InvalidRequest("query vectors have non-finite values")
    return rows


def parse_offset(offset: str) -> str:
    """Offsets are point ids (UUID strings) handed out by `scroll`; anything else is a caller's mistake."""
    try:
        return str(uuid.UUID(offset))
    except (ValueError, AttributeError, TypeError) as exc:
        raise InvalidRequest(f"not a scroll offset from this store: {offset!r}") from exc


def metadata_term(key: str, value: str) -> str:
    """One metadata entry as the keyword stored in METADATA_TERMS: a 128-bit digest of `[key, value]` in
    JSON (so that no key or value can pass for another)."""
    entry = json.dumps([key, value], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(entry.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def metadata_terms(metadata: Mapping[str, str]) -> list[str]:
    """What a product stores in METADATA_TERMS: MARKER, then one digest per metadata entry."""
    return [MARKER, *(metadata_term(str(k), str(v)) for k, v in metadata.items())]


@functools.lru_cache(maxsize=64)
def condition_terms(condition: Condition) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The keywords a condition's any_of and none_of stand for: a product passes when its METADATA_TERMS
    hold one of the first (if any) and none of the second (a product without the key passes none_of).
    Cached: a Recommend builds its filter for every category and store call."""
    return (
        tuple(metadata_term(condition.key, v) for v in condition.any_of),
        tuple(metadata_term(condition.key, v) for v in condition.none_of),
    )
