"""Faults with real processes: the ranker killed (SIGKILL) in the middle of a `ctl ingest` job; a store
that cannot be opened (held by another ranker, as in a rolling update on one volume; a Qdrant URL that does
not answer).

(Other faults live beside the parts they hit: the encoder killed, tests/test_ranker_service.py; Triton
killed, tests/test_triton_encoder.py; the store's lock, tests/test_store.py.)
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from tests.servers import REPO, Process, health, wait_serving, wait_until

PRODUCTS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _landed(journal: Path) -> int:
    if not journal.exists():
        return 0
    count = 0
    for line in journal.read_text().splitlines()[1:]:
        try:
            count += json.loads(line)["ok"] is True
        except (json.JSONDecodeError, KeyError):
            pass  # a torn last line
    return count


def test_ranker_killed_during_ingestion_the_job_retries_and_the_catalog_ends_complete(
    exported_repo, synth_dir, tmp_path
):
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    rows = [
        {"product_id": sig, "category": cat, "image": str(synth_dir / "images" / f"{sig}.jpg")}
        for sig, cat in sorted(categories.items())[:PRODUCTS]
    ]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    journal = tmp_path / "catalog.jsonl.journal"
    encoder = Process(
        "serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--metrics-port", "-1"
    )
    port = _free_port()
    store = str(tmp_path / "store" / "{model_version}")
    ranker_args = (
        "serve-ranker", "--encoder", encoder.address, "--store-path", store, "--port", str(port),
        "--metrics-port", "-1",
    )  # fmt: skip
    ranker = Process(*ranker_args)
    job = None
    try:
        wait_serving(ranker.address)
        job = subprocess.Popen(
            [sys.executable, "-m", "ctl.cli", "ingest", str(catalog), "--ranker", ranker.address,
             "--batch", "4", "--streams", "2", "--retries", "8"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while _landed(journal) < 12:
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.005)
        ranker.stop(kill=True)  # SIGKILL in the middle of the job's streams
        assert ranker.proc.returncode == -signal.SIGKILL
        assert _landed(journal) < PRODUCTS, "the job finished before the ranker was killed"
        time.sleep(1.0)
        ranker = Process(*ranker_args)  # the same port and store: the job's retries reach it
        out, _ = job.communicate(timeout=240)
        assert job.returncode == 0, out
        assert "retry" in out  # the job saw the ranker go and retried
        with grpc.insecure_channel(ranker.address) as channel:
            stats = ranker_pb2_grpc.RankerServiceStub(channel).GetCatalogStats(
                ranker_pb2.GetCatalogStatsRequest(), timeout=30
            )
        assert stats.total_products == PRODUCTS  # every product, none twice
        assert dict(stats.products_by_category) == dict(Counter(r["category"] for r in rows))
        assert _landed(journal) == PRODUCTS
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        ranker.stop()
        encoder.stop()


def _ranker(encoder: Process, store: str, *extra: str) -> Process:
    return Process(
        "serve-ranker", "--encoder", encoder.address, "--store-path", store, "--port", "0",
        "--metrics-port", "-1", *extra,
    )  # fmt: skip


def _recommend(address: str, scene: bytes, timeout: float) -> ranker_pb2.RecommendResponse:
    with grpc.insecure_channel(address) as channel:
        return ranker_pb2_grpc.RankerServiceStub(channel).Recommend(
            ranker_pb2.RecommendRequest(scene_image=scene, categories=["shoes"], limit=5), timeout=timeout
        )


def test_a_store_held_by_another_ranker_is_waited_for_and_served_once_let_go(
    exported_repo, synth_dir, tmp_path
):
    """A rolling update on one volume: the new ranker starts while the old one still holds the embedded
    store. It answers UNAVAILABLE (saying why) within the caller's deadline, is NOT_SERVING, and serves the
    same catalog by itself once the old one has stopped. A ranker that waits past --startup-timeout-s
    exits 1 with the reason."""
    images = sorted((synth_dir / "images").glob("*.jpg"))
    encoder = Process(
        "serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--metrics-port", "-1"
    )
    store = str(tmp_path / "store" / "{model_version}")
    old = _ranker(encoder, store)
    new = impatient = None
    try:
        wait_serving(old.address)
        with grpc.insecure_channel(old.address) as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            products = (
                ranker_pb2.UpsertProductsRequest(
                    product=ranker_pb2.Product(product_id=f"p{i}", category="shoes", image=path.read_bytes())
                )
                for i, path in enumerate(images[:8])
            )
            assert stub.UpsertProducts(products, timeout=60).upserted == 8
        scene = images[-1].read_bytes()
        before = _recommend(old.address, scene, timeout=30)

        new = _ranker(encoder, store)
        with pytest.raises(grpc.RpcError) as refused:
            _recommend(new.address, scene, timeout=3)
        # UNAVAILABLE, not DEADLINE_EXCEEDED: refused before the call's deadline, not kept waiting
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "waiting for the store" in refused.value.details()
        assert "already open in another process" in refused.value.details()
        assert health(new.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _recommend(old.address, scene, timeout=30) == before  # the old one serves on, untouched

        impatient = _ranker(encoder, store, "--startup-timeout-s", "2")
        assert impatient.proc.wait(30) == 1
        assert "gave up after 2 s" in impatient.output() and "already open" in impatient.output()

        assert old.stop() == 0  # SIGTERM: drains, flushes, lets the store go
        wait_serving(new.address, timeout=20)  # without a restart
        assert _recommend(new.address, scene, timeout=30) == before
        assert "waiting for the store" in new.output()
    finally:
        for process in (old, new, impatient):
            if process is not None:
                process.stop()
        encoder.stop()


def test_an_unreachable_qdrant_server_is_reported_and_waited_for(exported_repo, synth_dir, tmp_path):
    """--qdrant-url pointing at a port where nothing answers (the server not up yet): UNAVAILABLE naming
    the URL within the deadline, NOT_SERVING, retries in the log; past --startup-timeout-s, exit 1. (That
    it then opens the collection once the server is up needs a Qdrant server, which this machine lacks;
    the same waiting code opens the embedded store in the test above.)"""
    url = f"http://127.0.0.1:{_free_port()}"
    encoder = Process(
        "serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--metrics-port", "-1"
    )
    ranker = Process(
        "serve-ranker", "--encoder", encoder.address, "--qdrant-url", url, "--qdrant-timeout-s", "1",
        "--startup-timeout-s", "8", "--port", "0", "--metrics-port", "-1",
    )  # fmt: skip
    try:
        scene = next((synth_dir / "images").glob("*.jpg")).read_bytes()
        wait_until(lambda: "waiting for the store" in ranker.output(), timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            _recommend(ranker.address, scene, timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"cannot reach Qdrant at {url}" in refused.value.details()
        assert health(ranker.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert ranker.proc.wait(30) == 1
        assert "gave up after 8 s" in ranker.output()
    finally:
        ranker.stop()
        encoder.stop()
