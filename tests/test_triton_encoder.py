"""The encoder service on a real Triton server (CPU; tools/triton_cpu.py): same embeddings as the
in-process backend, concurrent calls merged by Triton's dynamic batcher, UNAVAILABLE and NOT_SERVING while
Triton is down and recovery when it is back, and the whole Recommend path through Triton still exact.

Needs `make triton-cpu` once (the Makefile's test target runs it); nothing is downloaded here."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from ctl.tensors import product_from_proto, scene_from_proto
from ctl.v1 import encoder_pb2, ranker_pb2, ranker_pb2_grpc
from ranker_service.config import RankerConfig
from ranker_service.server import Ranker
from style_model.distances import hybrid_distances
from tests.servers import Encoder, encoder_config, wait_until
from tools import triton_cpu

NOT_SERVING_STATUSES = (2, -1)  # NOT_SERVING, or no answer


@pytest.fixture(scope="module")
def home():
    try:
        return triton_cpu.setup(triton_cpu.default_home(), install=False)
    except triton_cpu.NotSetUpError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def twin(exported_repo, tmp_path_factory):
    return triton_cpu.write_twin(exported_repo, tmp_path_factory.mktemp("twin"))


@pytest.fixture(scope="module")
def triton(home, twin, tmp_path_factory):
    server = triton_cpu.start(home, twin, log_path=tmp_path_factory.mktemp("triton") / "triton.log")
    try:
        yield server.wait_ready(120)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local(loop, exported_repo):
    server = Encoder(loop, encoder_config(exported_repo))
    try:
        yield server.wait_serving()
    finally:
        server.close()


@pytest.fixture(scope="module")
def remote(loop, exported_repo, triton):
    """The Triton backend with small batches and four passes in flight, so that Triton gets concurrent
    requests to merge."""
    config = encoder_config(
        exported_repo,
        backend="triton",
        triton_url=triton.grpc_url,
        triton_timeout_s=3,
        max_batch=2,
        max_wait_ms=1,
        inflight=4,
    )
    server = Encoder(loop, config)
    try:
        yield server.wait_serving()
    finally:
        server.close()


@pytest.fixture(scope="module")
def images(synth_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((synth_dir / "images").glob("*.jpg"))[:24]]


def _scene(stub, image):
    return stub.EncodeScene(encoder_pb2.EncodeSceneRequest(image=image), timeout=30).embedding


def test_triton_backend_equals_the_in_process_backend(local, remote, images):
    info = remote.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest())
    assert info.backend == "triton"
    assert info.model_version == local.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest()).model_version
    for image in images[:3]:
        a = scene_from_proto(_scene(local.stub, image), info.regions, info.embedding_dim)
        b = scene_from_proto(_scene(remote.stub, image), info.regions, info.embedding_dim)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, atol=1e-5)
    for batch in (images[3:4], images[4:9]):
        request = encoder_pb2.EncodeProductsRequest(images=batch)
        a = local.stub.EncodeProducts(request, timeout=30).results
        b = remote.stub.EncodeProducts(request, timeout=30).results
        assert len(a) == len(b) == len(batch)
        for x, y in zip(a, b):
            for u, v in zip(
                product_from_proto(x.embedding, info.embedding_dim),
                product_from_proto(y.embedding, info.embedding_dim),
            ):
                np.testing.assert_allclose(u, v, atol=1e-5)


def _stats(url: str, model: str) -> tuple[int, int]:
    """(requests that succeeded, batches executed) of a Triton model."""
    client = triton_grpc.InferenceServerClient(url)
    try:
        (stats,) = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"]
    finally:
        client.close()
    return int(stats["inference_stats"]["success"]["count"]), int(stats.get("execution_count", 0))


def test_concurrent_calls_are_merged_by_tritons_dynamic_batcher(remote, triton, images):
    requests0, executions0 = _stats(triton.grpc_url, "scene_encoder")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda im: _scene(remote.stub, im), images[:16]))
    # Triton's statistics lag its responses a little
    wait_until(lambda: _stats(triton.grpc_url, "scene_encoder")[0] > requests0, timeout=10)
    time.sleep(0.5)
    requests, executions = _stats(triton.grpc_url, "scene_encoder")
    sent, ran = requests - requests0, executions - executions0
    print(f"Triton: {sent} requests from the encoder ran as {ran} batches")
    assert sent >= 8  # the encoder sent batches of at most 2 images
    assert ran < sent


def test_triton_down_gives_unavailable_and_not_serving_then_recovers(
    home, twin, loop, exported_repo, images, tmp_path
):
    server = triton_cpu.start(home, twin, log_path=tmp_path / "triton.log").wait_ready(120)
    port = int(server.grpc_url.rsplit(":", 1)[1])
    config = encoder_config(exported_repo, backend="triton", triton_url=server.grpc_url, triton_timeout_s=1)
    encoder = Encoder(loop, config, health_poll_s=0.3).wait_serving()
    try:
        assert _scene(encoder.stub, images[0]).model_version
        server.kill()
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            _scene(encoder.stub, images[0])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert time.monotonic() - start < 5
        wait_until(lambda: encoder.status() in NOT_SERVING_STATUSES, timeout=10)
        server = triton_cpu.start(home, twin, grpc_port=port, log_path=tmp_path / "triton2.log").wait_ready(
            120
        )
        wait_until(lambda: encoder.status() == 1, timeout=20)  # SERVING again, same encoder process
        assert _scene(encoder.stub, images[0]).model_version
    finally:
        encoder.close()
        server.stop()


def test_recommend_through_triton_is_exact(loop, remote, local, synth_dir, tmp_path):
    """Ranker -> encoder -> Triton: certify mode equals a brute-force ranking made from the in-process
    backend's embeddings (ids, and distances within 1e-5)."""
    categories = json.loads((synth_dir / "fashion-cat.json").read_text())
    products = sorted(categories.items())[:120]
    data = {sig: (synth_dir / "images" / f"{sig}.jpg").read_bytes() for sig, _ in products}
    config = RankerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        encoder=f"127.0.0.1:{remote.server.port}",
        store_path=str(tmp_path / "store"),
    )

    async def start() -> Ranker:
        ranker = Ranker(config)  # built on the loop that runs it
        await ranker.start()
        return ranker

    ranker = loop.call(start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ranker.port}") as channel:
            stub = ranker_pb2_grpc.RankerServiceStub(channel)
            reply = stub.UpsertProducts(
                iter(
                    ranker_pb2.UpsertProductsRequest(
                        product=ranker_pb2.Product(product_id=sig, category=cat, image=data[sig])
                    )
                    for sig, cat in products
                ),
                timeout=120,
            )
            assert reply.upserted == len(products)
            info = local.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest())
            embedded = local.stub.EncodeProducts(
                encoder_pb2.EncodeProductsRequest(images=[data[s] for s, _ in products]), timeout=60
            ).results
            styles = np.stack([product_from_proto(r.embedding, info.embedding_dim)[0] for r in embedded])
            keys = np.stack([product_from_proto(r.embedding, info.embedding_dim)[1] for r in embedded])
            pairs = [json.loads(line) for line in (synth_dir / "fashion.json").read_text().splitlines()]
            for scene_sig in sorted({p["scene"] for p in pairs})[:3]:
                image = (synth_dir / "images" / f"{scene_sig}.jpg").read_bytes()
                scene = scene_from_proto(_scene(local.stub, image), info.regions, info.embedding_dim)
                cats = sorted({c for _, c in products})
                got = stub.Recommend(
                    ranker_pb2.RecommendRequest(
                        scene_image=image, categories=cats, limit=5, mode=ranker_pb2.RETRIEVAL_MODE_CERTIFY
                    ),
                    timeout=30,
                )
                for result in got.results:
                    idx = [i for i, (_, c) in enumerate(products) if c == result.category]
                    d = hybrid_distances(*scene, styles[idx], keys[idx]).hybrid
                    order = np.argsort(d, kind="stable")[:5]
                    assert [p.product_id for p in result.products] == [products[idx[i]][0] for i in order]
                    np.testing.assert_allclose([p.distance for p in result.products], d[order], atol=1e-5)
                    assert result.certified
    finally:
        loop.call(ranker.stop(grace=1))
