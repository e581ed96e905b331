"""`ctl snapshot` / `ctl restore` on a real embedded store: the catalog comes back exactly; a store a ranker
holds, an existing target and a damaged archive are refused with a reason, and nothing is half-written."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from ranker_service.store import ProductPoint, open_edge_store
from tests.servers import REPO

VERSION, DIM = "m-snap-1", 16


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ctl.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def products(n: int = 300) -> list[ProductPoint]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 2, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    return [
        ProductPoint(
            f"p{i}", ("shoes", "bags", "hats")[i % 3], vectors[i, 0], vectors[i, 1], {"i": str(i)}, VERSION
        )
        for i in range(n)
    ]


async def _fill(path: Path, points: list[ProductPoint]) -> None:
    store = await open_edge_store(path, VERSION, DIM)
    await store.upsert(points)
    await store.delete(["p0", "p1"])  # deletions are part of the state too
    await store.close()


async def _read(path: Path) -> dict[str, ProductPoint]:
    store = await open_edge_store(path, VERSION, DIM)
    try:
        found = await store.retrieve([f"p{i}" for i in range(400)])
    finally:
        await store.close()
    return {p.product_id: p for p in found}


def test_snapshot_and_restore_bring_back_the_same_catalog(tmp_path):
    points = products()
    source = tmp_path / "ctl-store" / VERSION
    asyncio.run(_fill(source, points))
    archive = tmp_path / "backups" / "catalog.tar.gz"
    done = ctl("snapshot", str(source), str(archive))
    assert done.returncode == 0, done.stderr
    assert "298 products" in done.stdout
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("ctl_snapshot.json").read())
    kept = Counter(p.category for p in points[2:])
    assert manifest["products"] == 298 and manifest["products_by_category"] == dict(kept)

    restored = ctl("restore", str(archive), str(tmp_path / "elsewhere" / "{model_version}"))
    assert restored.returncode == 0, restored.stderr
    got, want = asyncio.run(_read(tmp_path / "elsewhere" / VERSION)), asyncio.run(_read(source))
    assert set(got) == set(want) == {p.product_id for p in points[2:]}
    for pid, point in want.items():
        assert got[pid].category == point.category and dict(got[pid].metadata) == dict(point.metadata)
        assert np.array_equal(got[pid].style, point.style) and np.array_equal(
            got[pid].attention, point.attention
        )

    again = ctl("restore", str(archive), str(tmp_path / "elsewhere" / "{model_version}"))
    assert again.returncode == 1 and "already exists" in again.stderr  # never over an existing store


def test_a_held_store_and_a_damaged_archive_are_refused(tmp_path):
    source = tmp_path / "store"
    asyncio.run(_fill(source, products(30)))

    async def snapshot_while_open() -> subprocess.CompletedProcess:
        store = await open_edge_store(source, VERSION, DIM)  # a ranker would hold it like this
        try:
            return await asyncio.to_thread(ctl, "snapshot", str(source), str(tmp_path / "held.tar.gz"))
        finally:
            await store.close()

    held = asyncio.run(snapshot_while_open())
    assert held.returncode == 1 and "already open" in held.stderr
    assert not (tmp_path / "held.tar.gz").exists() and not list(tmp_path.glob(".held*"))

    archive = tmp_path / "good.tar.gz"
    assert ctl("snapshot", str(source), str(archive)).returncode == 0
    # a manifest that does not match the store inside: refused, and the target never appears
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    damaged = tmp_path / "damaged.tar.gz"
    with tarfile.open(damaged, "w:gz") as tar:
        for member, data in members:
            if member.name == "ctl_snapshot.json":
                manifest = json.loads(data)
                data = json.dumps({**manifest, "products": manifest["products"] + 1}).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    bad = ctl("restore", str(damaged), str(tmp_path / "restored"))
    assert bad.returncode == 1 and "damaged" in bad.stderr
    assert not (tmp_path / "restored").exists() and not list(tmp_path.glob(".restored*"))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:200])
    cut = ctl("restore", str(truncated), str(tmp_path / "restored"))
    assert cut.returncode == 1 and "cannot restore" in cut.stderr
    assert not (tmp_path / "restored").exists()
