"""The embedded store's in-memory product table: replace, delete, row reuse, growth, counts, safe copies.

Checked against a plain dict of products after a random sequence of puts and removes.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter

import numpy as np
import pytest

from ranker_service.store.base import ProductPoint, point_id
from ranker_service.store.table import ProductTable

DIM = 8


def product(rng: np.random.Generator, i: int, category: str, version: int = 0) -> ProductPoint:
    metadata = {"v": str(version)} if i % 2 else {}
    return ProductPoint(
        f"p{i}", category, rng.standard_normal(DIM).astype(np.float32),
        rng.standard_normal(DIM).astype(np.float32), metadata, "m-1",
    )  # fmt: skip


def test_table_matches_a_dict_after_random_puts_and_removes() -> None:
    rng, pick = np.random.default_rng(0), random.Random(0)
    table, want = ProductTable(DIM, "m-1", capacity=4), {}  # tiny capacity: it must grow many times
    for step in range(3000):
        i = pick.randrange(400)
        if pick.random() < 0.3:
            table.remove([point_id(f"p{i}"), point_id("never-there")])
            want.pop(f"p{i}", None)
        else:
            point = product(rng, i, pick.choice(["shoes", "bags", "hats"]), step)
            # the engine's ids are uuid.UUID, the store's writes use strings: both name the same row
            pid = point_id(point.product_id)
            table.put(uuid.UUID(pid) if step % 2 else pid, point)
            want[point.product_id] = point
    assert len(table) == len(want)
    assert table.counts() == dict(Counter(p.category for p in want.values()))
    assert table.count("shoes") == sum(p.category == "shoes" for p in want.values())
    ids = sorted(want)
    hits = table.hits([uuid.UUID(point_id(i)) for i in ids], np.arange(len(ids)))
    assert hits.ids == ids and hits.scores.tolist() == list(range(len(ids)))
    for row, (got, expected) in enumerate(zip(hits.points, (want[i] for i in ids))):
        assert (got.category, dict(got.metadata), got.model_version) == (
            expected.category, dict(expected.metadata), "m-1",
        )  # fmt: skip
        assert np.array_equal(got.style, expected.style) and np.array_equal(hits.styles[row], expected.style)
        assert np.array_equal(got.attention_key, expected.attention_key) and np.array_equal(
            hits.attention_keys[row], got.attention_key
        )
    assert table._styles.shape[0] < 2 * 400  # deleted rows were reused: capacity follows the live count


def test_hits_are_copies_and_unknown_ids_raise() -> None:
    rng = np.random.default_rng(1)
    table = ProductTable(DIM, "m-1")
    first = product(rng, 1, "shoes")
    table.put(point_id("p1"), first)
    hits = table.hits([point_id("p1")], [0.5])
    table.put(point_id("p1"), product(rng, 1, "bags"))  # a later write does not reach earlier results
    assert np.array_equal(hits.styles[0], first.style) and hits.points[0].category == "shoes"
    with pytest.raises(TypeError):
        hits.points[0].metadata["x"] = "y"  # type: ignore[index]  # read-only: shared with the table
    with pytest.raises(KeyError):
        table.hits([point_id("p2")], [0.1])
    assert table.counts() == {"bags": 1}
