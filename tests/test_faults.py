"""Faults with real processes: the ranker killed (SIGKILL) in the middle of a `ctl ingest` job; a store
that cannot be opened (held by another ranker, as in a rolling update on one volume; a Qdrant URL that does
not answer).

Models that change under running services (issue 14 item 4): an encoder restarted with another model (and
its files replaced under it while it runs), and the collection behind a Qdrant alias moved to another model's.

(Other faults live beside the parts they hit: the encoder killed, tests/test_ranker_service.py; Triton
killed or restarted with another model, tests/test_triton_encoder.py; the store's lock and a moved alias
at the store level, tests/test_store.py.)
"""

from __future__ import annotations

import json
import logging
import shutil
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

from ctl.encoder_contract import ENCODERS, MODEL_FILE, VERSION_DIR, model_file
from ctl.v1 import encoder_pb2, ranker_pb2, ranker_pb2_grpc
from ranker_service import server as ranker_server
from ranker_service.config import RankerConfig
from ranker_service.server import Ranker
from ranker_service.store.client import open_client_store
from tests.servers import (
    REPO,
    Encoder,
    HoldingProxy,
    Process,
    encoder_config,
    health,
    wait_serving,
    wait_until,
)

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
    loop, exported_repo, synth_dir, tmp_path
):
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    rows = [
        {"product_id": sig, "category": cat, "image": f"images/{sig}.jpg"}
        for sig, cat in sorted(categories.items())[:PRODUCTS]
    ]
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    journal = tmp_path / "catalog.jsonl.journal"
    encoder = Process(
        "serve-encoder", "--model-repo", str(exported_repo), "--port", "0", "--metrics-port", "-1"
    )
    # The ranker's 4th EncodeProducts call (the job's 4th stream of 4) is held until the ranker was killed:
    # the job cannot finish before the kill however fast the machine is, and streams are in flight at it.
    proxy = HoldingProxy(loop, encoder.address, "/ctl.v1.EncoderService/EncodeProducts", passes=3)
    port = _free_port()
    store = str(tmp_path / "store" / "{model_version}")
    ranker_args = (
        "serve-ranker", "--encoder", proxy.address, "--store-path", store, "--port", str(port),
        "--metrics-port", "-1",
    )  # fmt: skip
    ranker = Process(*ranker_args)
    job = None
    try:
        wait_serving(ranker.address)
        job = subprocess.Popen(
            [sys.executable, "-m", "ctl_app.cli", "ingest", str(catalog), "--ranker", ranker.address,
             "--images", str(synth_dir), "--batch", "4", "--streams", "2", "--retries", "8"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while _landed(journal) < 12:
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.005)
        ranker.stop(kill=True)  # SIGKILL in the middle of the job's streams
        assert ranker.proc.returncode == -signal.SIGKILL
        assert _landed(journal) < PRODUCTS and job.poll() is None
        proxy.release()
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
        proxy.close()
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
        refusals: list[grpc.RpcError] = []

        def refused_for_the_store() -> bool:
            # on a loaded machine the first refusals may still say it waits for the encoder: ask again
            with pytest.raises(grpc.RpcError) as refused:
                _recommend(new.address, scene, timeout=3)
            refusals.append(refused.value)
            return "waiting for the store" in refused.value.details()

        wait_until(refused_for_the_store, timeout=60)
        # UNAVAILABLE, not DEADLINE_EXCEEDED: refused before the call's deadline, not kept waiting
        assert {r.code() for r in refusals} == {grpc.StatusCode.UNAVAILABLE}
        assert "already open in another process" in refusals[-1].details()
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


# ---- models that change under running services (issue 14 item 4)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _repo_of_version(exported_repo: Path, out: Path, version: str) -> Path:
    """A copy of an exported repository whose encoders say another model version (what the next `ctl
    export` writes; the weights do not matter here: the version is the contract)."""
    import torch

    from style_model.export import EXTRA_FILES

    shutil.copytree(exported_repo, out)
    old = json.loads((out / "model_info.json").read_text())["model_version"]
    for path in out.glob(f"*/{VERSION_DIR}/{MODEL_FILE}"):
        extra = dict.fromkeys(EXTRA_FILES, "")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        torch.jit.save(module, str(path), _extra_files={**extra, "model_version": version})
    for path in [out / "model_info.json", *out.glob("*/config.pbtxt")]:
        path.write_text(path.read_text().replace(old, version))
    return out


def _start_ranker(loop, config: RankerConfig) -> Ranker:
    async def start() -> Ranker:
        ranker = Ranker(config)  # built on the loop that runs it
        await ranker.start()
        return ranker

    return loop.call(start())


def _products(images: list[Path]):
    for i, path in enumerate(images):
        yield ranker_pb2.UpsertProductsRequest(
            product=ranker_pb2.Product(product_id=f"p{i}", category="shoes", image=path.read_bytes())
        )


def _stays(address: str, status: int, seconds: float) -> bool:
    """The health is `status` at every look for `seconds` (several probe cycles)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if health(address) != status:
            return False
        time.sleep(0.05)
    return True


def test_an_encoder_restarted_with_another_model_keeps_the_ranker_not_serving(
    loop, exported_repo, synth_dir, tmp_path
):
    """The ranker opened its catalog for the model the encoder gave at start, and looked at that model only
    then: an encoder restarted with a new model (a rollout) answered SERVING, so the ranker turned SERVING
    again while every Recommend was refused. Now each probe reads the encoder's model info again: the ranker
    stays NOT_SERVING, saying why, and Recommend/UpsertProducts are FAILED_PRECONDITION naming both models,
    until the encoder of its catalog's model is back.

    The sibling on the encoder's side: the TorchScript files replaced under a running encoder change
    nothing it answers (it serves the modules it loaded, labelled with their version) until it restarts."""
    images = sorted((synth_dir / "images").glob("*.jpg"))
    served = shutil.copytree(exported_repo, tmp_path / "served")  # the folder the encoder runs from
    old = json.loads((served / "model_info.json").read_text())["model_version"]
    new = f"{old}-next"
    _repo_of_version(exported_repo, tmp_path / "next", new)
    port = _free_port()
    encoder = Encoder(loop, encoder_config(served, port=port)).wait_serving()
    config = RankerConfig(
        host="127.0.0.1", port=0, metrics_port=-1, encoder=f"127.0.0.1:{port}",
        store_path=str(tmp_path / "store" / "{model_version}"), probe_interval_s=0.2, startup_timeout_s=20,
    )  # fmt: skip
    ranker = _start_ranker(loop, config)
    address = f"127.0.0.1:{ranker.port}"
    scene = images[-1].read_bytes()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            assert stub.UpsertProducts(_products(images[:6]), timeout=60).upserted == 6
            before = _recommend(address, scene, timeout=30)
            assert before.model_version == old

            for name in ENCODERS:  # a new export copied over the running one
                shutil.copy2(model_file(tmp_path / "next", name), model_file(served, name))
            info = encoder.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=5)
            assert info.model_version == old
            assert _stays(address, SERVING, 1.0)
            assert _recommend(address, scene, timeout=30) == before

            encoder.close()  # restarted: it loads what its folder holds now
            encoder = Encoder(loop, encoder_config(served, port=port)).wait_serving()
            assert encoder.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest()).model_version == new
            wait_until(lambda: health(address) == NOT_SERVING, timeout=10)
            assert _stays(address, NOT_SERVING, 1.5), "the ranker serves a catalog of another model"
            assert health(address, "liveness") == SERVING
            for call in (
                lambda: _recommend(address, scene, timeout=30),
                lambda: stub.UpsertProducts(_products(images[6:7]), timeout=60),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
                assert old in refused.value.details() and new in refused.value.details()

            encoder.close()  # the catalog's model back
            for name in ENCODERS:
                shutil.copy2(model_file(exported_repo, name), model_file(served, name))
            encoder = Encoder(loop, encoder_config(served, port=port)).wait_serving()
            wait_until(lambda: health(address) == SERVING, timeout=10)
            assert _recommend(address, scene, timeout=30) == before
    finally:
        loop.call(ranker.stop(grace=1))
        encoder.close()


def _logged(caplog, text: str) -> list[str]:
    """The ranker's log lines so far that contain `text` (records arrive from the loop's thread)."""
    return [
        r.getMessage()
        for r in list(caplog.records)
        if r.name == ranker_server.__name__ and text in r.getMessage()
    ]


def test_the_ranker_logs_each_new_reason_it_is_not_serving(loop, exported_repo, tmp_path, caplog):
    """An encoder restarted with another model is first down ("not serving"), then up with the new model:
    the ranker logged only the first reason (it logged when SERVING flipped, and it stays NOT_SERVING), so
    on-call read a stale one. Now each change of reason is logged, once: not on every probe."""
    caplog.set_level(logging.WARNING, logger=ranker_server.__name__)
    served = shutil.copytree(exported_repo, tmp_path / "served")
    new = json.loads((served / "model_info.json").read_text())["model_version"] + "-next"
    _repo_of_version(exported_repo, tmp_path / "next", new)
    port = _free_port()
    encoder = Encoder(loop, encoder_config(served, port=port)).wait_serving()
    config = RankerConfig(
        host="127.0.0.1", port=0, metrics_port=-1, encoder=f"127.0.0.1:{port}",
        store_path=str(tmp_path / "store" / "{model_version}"), probe_interval_s=0.2, startup_timeout_s=20,
    )  # fmt: skip
    ranker = _start_ranker(loop, config)
    address = f"127.0.0.1:{ranker.port}"
    try:
        encoder.close()
        wait_until(lambda: _logged(caplog, "is not serving: NOT_SERVING"), timeout=10)
        assert health(address) == NOT_SERVING
        encoder = Encoder(loop, encoder_config(tmp_path / "next", port=port)).wait_serving()
        wait_until(lambda: _logged(caplog, f"now serves model {new}"), timeout=10)
        assert _stays(address, NOT_SERVING, 1.0)  # several probes, the same reason
        assert len(_logged(caplog, f"now serves model {new}")) == 1
        assert len(_logged(caplog, "is not serving: NOT_SERVING")) == 1
    finally:
        loop.call(ranker.stop(grace=1))
        encoder.close()


def test_a_ranker_on_a_qdrant_alias_moved_to_another_model_refuses_until_it_is_moved_back(
    loop, exported_repo, synth_dir, tmp_path, monkeypatch
):
    """`--collection` naming an alias that is moved later (a new model's catalog switched in under a
    running ranker of the old model): before, Recommend scored the other model's vectors and UpsertProducts
    wrote into its collection. Now the probe's store check sees the collection behind the alias: NOT_SERVING,
    and Recommend/UpsertProducts FAILED_PRECONDITION naming both models, until the alias is moved back.

    No Qdrant server here: the ranker's store is qdrant-client's local mode (the same adapter and client
    API), opened where the ranker would open its server's collection; the alias is moved through the
    store's own client (local mode allows one client per folder)."""
    images = sorted((synth_dir / "images").glob("*.jpg"))
    path = tmp_path / "qdrant"

    async def local_store(config, info, qdrant=(None, None)):
        return await open_client_store(
            None, info.model_version, info.embedding_dim, path=path, collection="products"
        )

    monkeypatch.setattr(ranker_server, "open_store", local_store)
    encoder = Encoder(loop, encoder_config(exported_repo)).wait_serving()
    info = encoder.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest())
    other = f"{info.model_version}-next"

    async def make_collections() -> None:
        for name, version in (("products_old", info.model_version), ("products_new", other)):
            store = await open_client_store(None, version, info.embedding_dim, path=path, collection=name)
            if name == "products_new":
                await store._live().update_collection_aliases(
                    change_aliases_operations=[_create_alias("products", "products_old")]
                )
            await store.close()

    loop.call(make_collections())
    config = RankerConfig(
        host="127.0.0.1", port=0, metrics_port=-1, encoder=f"127.0.0.1:{encoder.server.port}",
        probe_interval_s=0.2, startup_timeout_s=20,
    )  # fmt: skip
    ranker = _start_ranker(loop, config)
    address = f"127.0.0.1:{ranker.port}"
    scene = images[-1].read_bytes()
    client = ranker.store._live()

    async def move(to: str) -> None:
        from qdrant_client import models as qm

        await client.update_collection_aliases(
            change_aliases_operations=[
                qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name="products")),
                _create_alias("products", to),
            ]
        )

    try:
        with grpc.insecure_channel(address) as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            assert stub.UpsertProducts(_products(images[:6]), timeout=60).upserted == 6
            before = _recommend(address, scene, timeout=30)

            loop.call(move("products_new"))
            wait_until(lambda: health(address) == NOT_SERVING, timeout=10)
            assert health(address, "liveness") == SERVING
            for call in (
                lambda: _recommend(address, scene, timeout=30),
                lambda: stub.UpsertProducts(_products(images[6:7]), timeout=60),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
                details = refused.value.details()
                assert "products_new" in details and other in details and info.model_version in details
            assert loop.call(client.count("products_new")).count == 0  # nothing of the old model went there

            loop.call(move("products_old"))
            wait_until(lambda: health(address) == SERVING, timeout=10)
            assert _recommend(address, scene, timeout=30) == before
    finally:
        loop.call(ranker.stop(grace=1))
        encoder.close()


def _create_alias(alias: str, collection: str):
    from qdrant_client import models as qm

    return qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=collection, alias_name=alias))


def test_sigterm_while_waiting_for_the_encoder_at_start_up_stops_the_ranker(tmp_path):
    """Issue 20 #5's sibling: SIGTERM was only looked at once start-up was over, so a ranker waiting for an
    encoder that is not there (here: a port nobody listens on, start-up timeout 10 minutes) ignored it
    until the timeout, and Kubernetes had to SIGKILL the pod. Now it stops at once, exit status 0."""
    nobody = f"127.0.0.1:{_free_port()}"  # closed again: nobody answers there
    ranker = Process(
        "serve-ranker", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--encoder", nobody,
        "--store-path", str(tmp_path / "store" / "{model_version}"), "--startup-timeout-s", "600",
    )  # fmt: skip
    wait_until(lambda: "waiting" in ranker.output().lower(), timeout=60)
    assert ranker.stop() == 0, ranker.output()[-2000:]  # not killed after 30 s (-9)
    assert "stopped while starting" in ranker.output()
