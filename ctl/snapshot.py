"""`ctl snapshot` / `ctl restore`: the embedded catalog as one archive, and back.

qdrant-edge cannot snapshot a live shard from Python, and its write-ahead log locks the directory while a
ranker has it open; so a snapshot is taken of a store no ranker holds (stop the ranker, or snapshot a
replica's copy): the store is opened (which proves nobody else has it and replays its log), flushed and
closed, then archived as a .tar.gz with a manifest (model version, dimension, products per category).
Restore unpacks into a fresh folder beside the target, opens it and checks the manifest's counts, and only
then moves it into place: a target that exists is never touched. Archives are extracted with tarfile's
"data" filter (no absolute paths, links out of the folder or device files).

A Qdrant server has its own snapshots (POST /collections/NAME/snapshots; deploy/qdrant/values.yaml keeps
a snapshot volume), which these commands do not replace.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

from ranker_service.errors import StoreError
from ranker_service.store import open_edge_store
from ranker_service.store.edge import META_FILE

MANIFEST = "ctl_snapshot.json"
FORMAT = 1


class SnapshotError(Exception):
    """A snapshot cannot be taken or restored; the message says why and what to do."""


async def _inventory(store_dir: Path) -> dict:
    """Opens the store (proving no ranker holds it), reads what it holds, flushes and closes it."""
    meta_path = store_dir / META_FILE
    if not meta_path.is_file():
        raise SnapshotError(f"{store_dir} is not an embedded ctl store (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    try:
        store = await open_edge_store(store_dir, meta["model_version"], int(meta["dim"]))
    except StoreError as exc:
        raise SnapshotError(f"cannot open {store_dir}: {exc}") from exc
    try:
        counts = await store.counts_by_category()
    finally:
        await store.close()
    return {
        "format": FORMAT,
        "model_version": meta["model_version"],
        "dim": int(meta["dim"]),
        "products": sum(counts.values()),
        "products_by_category": dict(sorted(counts.items())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def snapshot(store_dir: Path, out: Path) -> dict:
    """Archives the embedded store at `store_dir` into `out` (.tar.gz, written atomically); the manifest."""
    manifest = asyncio.run(_inventory(store_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            data = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, fileobj=io.BytesIO(data))
            tar.add(store_dir, arcname="store")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def restore(archive: Path, target: str) -> tuple[Path, dict]:
    """Unpacks `archive` into `target` ({model_version} is replaced from the manifest), which must not
    exist; checks that the restored store opens and holds what the manifest says. (folder, manifest)"""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(MANIFEST)
            if member is None:
                raise SnapshotError(f"{archive} has no {MANIFEST}: not a ctl snapshot")
            manifest = json.loads(member.read())
            if manifest.get("format") != FORMAT:
                raise SnapshotError(
                    f"{archive}: snapshot format {manifest.get('format')!r}, expected {FORMAT}"
                )
            folder = Path(target.replace("{model_version}", manifest["model_version"]))
            if folder.exists():
                raise SnapshotError(
                    f"{folder} already exists: restore into a new folder (or move this one away first)"
                )
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.restore-", dir=folder.parent))
            try:
                tar.extractall(staging, filter="data")
                restored = staging / "store"
                found = asyncio.run(_inventory(restored))
                for key in ("model_version", "dim", "products", "products_by_category"):
                    if found[key] != manifest[key]:
                        raise SnapshotError(
                            f"{archive}: the restored store holds {key} {found[key]!r}, the manifest says "
                            f"{manifest[key]!r}; the archive is damaged"
                        )
                os.replace(restored, folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, OSError, KeyError, json.JSONDecodeError, EOFError) as exc:
        raise SnapshotError(f"cannot restore {archive}: {type(exc).__name__}: {exc}") from exc
    return folder, manifest
