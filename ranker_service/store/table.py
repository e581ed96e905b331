"""The embedded store's in-memory copy of its products, laid out for the ranker (DESIGN.md §2).

qdrant-edge hands vectors and payloads to Python one float and one dict at a time, which costs more than
the search itself (docs/BENCHMARKS.md), so the embedded store asks the engine for ids and scores only and
takes the products from here. Vectors live in two contiguous float32 arrays [capacity, D] (a search's
candidates are one fancy index, not N small arrays to stack); per product there is one dict entry
(point id as an int -> row) and one small tuple (product id, category, metadata). About 1.2 KB per 128-d
product, the vectors 1 KB of it. Deleted rows are reused.
"""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import overload

import numpy as np
from numpy.typing import NDArray

from ranker_service.store.base import Hits, ProductPoint

_NO_METADATA: Mapping[str, str] = MappingProxyType({})
_GROWTH = 1.5


class ProductTable:
    """Products by point id (a `uuid.UUID`, or its string), with exact counts per category."""

    def __init__(self, embedding_dim: int, model_version: str, capacity: int = 1024) -> None:
        self.embedding_dim = embedding_dim
        self.model_version = model_version
        self._rows: dict[int, int] = {}
        self._styles = np.zeros((max(capacity, 1), embedding_dim), dtype=np.float32)
        self._attention_keys = np.zeros_like(self._styles)
        self._info: list[tuple[str, str, Mapping[str, str]] | None] = []
        self._free: list[int] = []
        self._counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, pid: object) -> bool:
        return isinstance(pid, uuid.UUID | str) and _as_int(pid) in self._rows

    def count(self, category: str) -> int:
        return self._counts.get(category, 0)

    def counts(self) -> dict[str, int]:
        return {c: n for c, n in self._counts.items() if n > 0}

    def put(self, pid: uuid.UUID | str, point: ProductPoint) -> None:
        """Insert or replace the product stored under point id `pid`."""
        number = _as_int(pid)
        row = self._rows.get(number)
        if row is None:
            row = self._free.pop() if self._free else self._append()
            self._rows[number] = row
        else:
            self._counts[self._info[row][1]] -= 1  # type: ignore[index]
        category = sys.intern(point.category)
        self._styles[row] = point.style
        self._attention_keys[row] = point.attention_key
        self._info[row] = (point.product_id, category, dict(point.metadata) or _NO_METADATA)
        self._counts[category] += 1

    def remove(self, pids: Iterable[uuid.UUID | str]) -> None:
        """Forget these point ids; unknown ones are ignored."""
        for pid in pids:
            row = self._rows.pop(_as_int(pid), None)
            if row is not None:
                self._counts[self._info[row][1]] -= 1  # type: ignore[index]
                self._info[row] = None
                self._free.append(row)

    def metadata(self, pid: uuid.UUID | str) -> Mapping[str, str]:
        """The metadata of a stored product."""
        info = self._info[self._rows[_as_int(pid)]]
        assert info is not None
        return info[2]

    def not_unit(self, tolerance: float) -> list[int]:
        """Point ids (as ints) of the products whose style or attention key is not of unit length within
        `tolerance`."""
        pids = list(self._rows)
        rows = np.fromiter(self._rows.values(), dtype=np.intp, count=len(pids))
        off = np.zeros(len(rows), dtype=bool)
        for vectors in (self._styles, self._attention_keys):
            off |= ~(np.abs(np.linalg.norm(vectors[rows], axis=1) - 1.0) <= tolerance)
        return [pids[i] for i in np.flatnonzero(off)]

    def hits(self, pids: Sequence[uuid.UUID | str], scores: Sequence[float] | None = None) -> Hits:
        """The products under `pids` (KeyError for one this table does not hold), as Hits with `scores`.
        Vectors and infos are taken now (later writes do not reach them); ProductPoints are made on access."""
        rows = np.fromiter((self._rows[_as_int(p)] for p in pids), dtype=np.intp, count=len(pids))
        infos = [self._info[row] for row in rows]
        styles, attention_keys = self._styles[rows], self._attention_keys[rows]
        return Hits(
            [info[0] for info in infos],  # type: ignore[index]
            np.zeros(len(rows), np.float32) if scores is None else np.asarray(scores, dtype=np.float32),
            styles,
            attention_keys,
            _Points(infos, styles, attention_keys, self.model_version),  # type: ignore[arg-type]
        )

    def _append(self) -> int:
        row = len(self._info)
        if row == len(self._styles):
            capacity = int(len(self._styles) * _GROWTH) + 1
            self._styles = _grown(self._styles, capacity)
            self._attention_keys = _grown(self._attention_keys, capacity)
        self._info.append(None)
        return row


class _Points(Sequence[ProductPoint]):
    """Hits' products, each made when asked for (a search returns hundreds, the ranker keeps ten)."""

    def __init__(
        self,
        infos: list[tuple[str, str, Mapping[str, str]]],
        styles: NDArray[np.float32],
        attention_keys: NDArray[np.float32],
        model_version: str,
    ) -> None:
        self._infos, self._styles, self._version = infos, styles, model_version
        self._attention_keys = attention_keys

    def __len__(self) -> int:
        return len(self._infos)

    @overload
    def __getitem__(self, i: int) -> ProductPoint: ...
    @overload
    def __getitem__(self, i: slice) -> list[ProductPoint]: ...
    def __getitem__(self, i: int | slice) -> ProductPoint | list[ProductPoint]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        product_id, category, metadata = self._infos[i]
        shown = MappingProxyType(metadata) if metadata else _NO_METADATA  # read-only: shared with the table
        style, attention_key = self._styles[i], self._attention_keys[i]
        return ProductPoint(product_id, category, style, attention_key, shown, self._version)


def _as_int(pid: uuid.UUID | str) -> int:
    """A point id as the int it is kept under."""
    return pid.int if isinstance(pid, uuid.UUID) else uuid.UUID(pid).int


def _grown(array: NDArray[np.float32], capacity: int) -> NDArray[np.float32]:
    grown = np.zeros((capacity, array.shape[1]), dtype=array.dtype)
    grown[: len(array)] = array
    return grown
