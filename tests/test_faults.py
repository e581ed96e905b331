"""Faults with real processes: the ranker killed (SIGKILL) in the middle of a `ctl ingest` job.

(Other faults live beside the parts they hit: the encoder killed, tests/test_ranker_service.py; Triton
killed, tests/test_triton_encoder.py; two rankers on one store directory, tests/test_ranker_service.py and
tests/test_store.py.)
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

from ctl.v1 import ranker_pb2, ranker_pb2_grpc
from tests.servers import REPO, Process, wait_serving

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
