"""The store package's side of `ctl snapshot` / `ctl restore` (ranker_service/store/snapshot.py, record.py),
on a real embedded store: what `inspect_store` finds, what `store_files` hands over and what both refuse.
The archive around them is tests/test_snapshot.py's."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

from ranker_service.store.base import ProductPoint
from ranker_service.store.edge import open_edge_store
from ranker_service.store.record import META_FILE, StoreFileError, read_record
from ranker_service.store.snapshot import inspect_store, store_files

VERSION, DIM = "m-files-1", 8


def _points(n: int) -> list[ProductPoint]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 2, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    return [
        ProductPoint(f"p{i}", ("shoes", "bags")[i % 2], vectors[i, 0], vectors[i, 1], {}, VERSION)
        for i in range(n)
    ]


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store"

    async def fill() -> None:
        opened = await open_edge_store(path, VERSION, DIM)
        await opened.upsert(_points(5))
        await opened.close()

    asyncio.run(fill())
    return path


def _never_refuse(name: str, where: Path) -> None:
    pass


def _copy(store: Path) -> dict[str, bytes | None]:
    """What `store_files` hands over: name -> bytes (None for a folder)."""
    got: dict[str, bytes | None] = {}
    with contextlib.closing(store_files(store, "root", _never_refuse)) as files:
        for item in files:
            got[item.name] = None if item.content is None else item.content.read(item.stat.st_size + 1)
    return got


def test_inspect_store_reads_the_record_and_the_counts(store):
    found = asyncio.run(inspect_store(store, "the store"))
    assert (found.model_version, found.embedding_dim, found.counts) == (VERSION, DIM, {"shoes": 3, "bags": 2})
    assert read_record(store, "the store").embedding_dim == DIM


def test_inspect_store_refuses_a_store_held_open_and_a_folder_without_a_record(store, tmp_path):
    async def while_held() -> None:
        held = await open_edge_store(store, VERSION, DIM)
        try:
            with pytest.raises(StoreFileError, match=r"cannot open the store: .*already open"):
                await inspect_store(store, "the store")
        finally:
            await held.close()

    asyncio.run(while_held())
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreFileError, match=f"the folder is not an embedded ctl store \\(no {META_FILE}\\)"):
        asyncio.run(inspect_store(tmp_path / "empty", "the folder"))


def test_store_files_hands_over_every_folder_and_file_as_it_is(store):
    got = _copy(store)
    want = {"root": None}
    for folder, dirs, files in os.walk(store):
        rel = Path(folder).relative_to(store)
        for name in dirs:
            want[str(Path("root", rel, name))] = None
        for name in files:
            want[str(Path("root", rel, name))] = (Path(folder) / name).read_bytes()
    assert got == want
    names = list(got)
    assert names[0] == "root" and got[f"root/{META_FILE}"] is not None


def test_store_files_refuses_links_and_lets_the_caller_refuse_names(store, tmp_path):
    (tmp_path / "secret").write_text("outside")
    (store / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(StoreFileError, match="leak is a symbolic link"):
        _copy(store)
    (store / "leak").unlink()

    def refuse(name: str, where: Path) -> None:
        if name.endswith(META_FILE):
            raise ValueError(f"refused {name}")

    with (
        pytest.raises(ValueError, match=f"refused root/{META_FILE}"),
        contextlib.closing(store_files(store, "root", refuse)) as files,
    ):
        for _ in files:
            pass
