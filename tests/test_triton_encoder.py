"""The encoder service on a real Triton server (CPU; tools/triton_cpu): same embeddings as the
in-process backend, concurrent calls merged by Triton's dynamic batcher, UNAVAILABLE and NOT_SERVING while
Triton is down and recovery when it is back, and the whole Recommend path through Triton still exact.

Needs `make triton-cpu` once (the Makefile's test target runs it); nothing is downloaded here."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2

from ctl.encoder_contract import (
    INPUT,
    PRODUCT_ENCODER,
    SCENE_ENCODER,
    encoders,
)
from ctl.tensors import product_from_proto, scene_from_proto
from ctl.v1 import encoder_pb2, ranker_pb2, ranker_pb2_grpc
from encoder_service.backends.triton import TritonBackend
from encoder_service.errors import ModelChanged
from ranker_service.config import RankerConfig
from ranker_service.server import Ranker
from style_model.distances import hybrid_distances
from tests.servers import Encoder, encoder_config, wait_until
from tools.triton_cpu.errors import NotSetUpError
from tools.triton_cpu.home import default_home
from tools.triton_cpu.install import setup
from tools.triton_cpu.server import start
from tools.triton_cpu.twin import write_twin

NOT_SERVING_STATUSES = (2, -1)  # NOT_SERVING, or no answer


@pytest.fixture(scope="module")
def home():
    try:
        return setup(default_home(), install=False)
    except NotSetUpError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def twin(exported_repo, tmp_path_factory):
    return write_twin(exported_repo, tmp_path_factory.mktemp("twin"))


@pytest.fixture(scope="module")
def triton(home, twin, tmp_path_factory):
    server = start(home, twin, log_path=tmp_path_factory.mktemp("triton") / "triton.log")
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
    requests0, executions0 = _stats(triton.grpc_url, SCENE_ENCODER)
    passes0 = remote.app.scenes.forward_passes
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda im: _scene(remote.stub, im), images[:16]))
    # Triton counts a request after answering it: wait until it has counted every pass the encoder sent
    passes = remote.app.scenes.forward_passes - passes0
    wait_until(lambda: _stats(triton.grpc_url, SCENE_ENCODER)[0] - requests0 >= passes, timeout=60)
    requests, executions = _stats(triton.grpc_url, SCENE_ENCODER)
    sent, ran = requests - requests0, executions - executions0
    print(f"Triton: {sent} requests from the encoder ran as {ran} batches")
    assert sent >= 8  # the encoder sent batches of at most 2 images
    assert ran < sent


def test_triton_down_gives_unavailable_and_not_serving_then_recovers(
    home, twin, loop, exported_repo, images, tmp_path
):
    server = start(home, twin, log_path=tmp_path / "triton.log").wait_ready(120)
    port = int(server.grpc_url.rsplit(":", 1)[1])
    config = encoder_config(exported_repo, backend="triton", triton_url=server.grpc_url, triton_timeout_s=1)
    encoder = Encoder(loop, config, health_poll_s=0.3).wait_serving()
    try:
        assert _scene(encoder.stub, images[0]).model_version
        server.kill()
        with pytest.raises(grpc.RpcError) as err:
            _scene(encoder.stub, images[0])
        # UNAVAILABLE from the backend, not the call's deadline passing
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        wait_until(lambda: encoder.status() in NOT_SERVING_STATUSES, timeout=10)
        server = start(home, twin, grpc_port=port, log_path=tmp_path / "triton2.log").wait_ready(120)
        wait_until(lambda: encoder.status() == 1, timeout=20)  # SERVING again, same encoder process
        assert _scene(encoder.stub, images[0]).model_version
    finally:
        encoder.close()
        server.stop()


def _twin_of_version(twin: Path, out: Path, version: str) -> Path:
    """A copy of the twin whose configs say another model version (what `ctl export` of the next model
    would write; the weights do not matter here, the label is the contract)."""
    shutil.copytree(twin, out)
    for path in out.glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        config.parameters["model_version"].string_value = version
        path.write_text(text_format.MessageToString(config))
    (out / "model_info.json").unlink(missing_ok=True)
    return out


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _refused_once_reachable(call, timeout: float = 60) -> grpc.RpcError:
    """The refusal of `call` once Triton is reachable again: a gRPC channel whose server went away
    reconnects with a backoff of its own, during which calls fail UNAVAILABLE."""
    deadline = time.monotonic() + timeout
    while True:
        error = _refused(call)
        if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
            return error
        time.sleep(0.2)


def test_triton_restarted_with_another_model_is_refused_not_labelled_with_the_old_version(
    home, twin, loop, exported_repo, images, tmp_path
):
    """Issue 14 item 4: a Triton that restarts with another model repository. The encoder read the version
    once, so it labelled the new model's vectors with the old version and the ranker mixed them into the old
    catalog. Now: every batch is confirmed against the config read after it (an encoder whose probe has not
    run yet refuses its first call), the probe cycle turns health NOT_SERVING, every call (GetModelInfo too)
    is FAILED_PRECONDITION naming both versions; back on the old model, it serves again by itself."""
    server = start(home, twin, log_path=tmp_path / "a.log").wait_ready(120)
    port = int(server.grpc_url.rsplit(":", 1)[1])
    config = encoder_config(exported_repo, backend="triton", triton_url=server.grpc_url, triton_timeout_s=3)
    probed = Encoder(loop, config, health_poll_s=0.3).wait_serving()
    unprobed = Encoder(loop, config, health_poll_s=3600).wait_serving()  # only its calls can notice
    ranker_config = RankerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        encoder=f"127.0.0.1:{unprobed.server.port}",
        store_path=str(tmp_path / "store"),
    )

    async def start_ranker() -> Ranker:
        ranker = Ranker(ranker_config)  # built on the loop that runs it
        await ranker.start()
        return ranker

    ranker = loop.call(start_ranker())
    ranker_channel = grpc.insecure_channel(f"127.0.0.1:{ranker.port}")
    recommend = ranker_pb2.RecommendRequest(scene_image=images[0], categories=["c"])
    try:
        ranker_stub = ranker_pb2_grpc.RankerServiceStub(ranker_channel)
        product = ranker_pb2.Product(product_id="p", category="c", image=images[1])
        assert ranker_stub.UpsertProducts(iter([ranker_pb2.UpsertProductsRequest(product=product)])).upserted
        assert ranker_stub.Recommend(recommend, timeout=30).results[0].products[0].product_id == "p"
        old = _scene(unprobed.stub, images[0]).model_version
        new = f"{old}-next"
        server.stop()
        other = _twin_of_version(twin, tmp_path / "next", new)
        server = start(home, other, grpc_port=port, log_path=tmp_path / "b.log").wait_ready(120)

        error = _refused_once_reachable(lambda: _scene(unprobed.stub, images[0]))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert old in error.details() and new in error.details() and "restart" in error.details()
        request = encoder_pb2.EncodeProductsRequest(images=images[:2])
        error = _refused(lambda: unprobed.stub.EncodeProducts(request, timeout=30))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        error = _refused(lambda: unprobed.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        # through the ranker too: not UNAVAILABLE (retry) but FAILED_PRECONDITION (the model changed)
        error = _refused_once_reachable(lambda: ranker_stub.Recommend(recommend, timeout=30))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert new in error.details()

        wait_until(lambda: probed.status() == 2, timeout=10)  # NOT_SERVING, with Triton up and ready
        assert probed.status("liveness") == 1  # not a reason to kill the process
        for stub in (probed.stub, unprobed.stub):
            error = _refused(lambda stub=stub: _scene(stub, images[0]))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()

        server.stop()  # Triton back on the model the encoder started with
        server = start(home, twin, grpc_port=port, log_path=tmp_path / "c.log").wait_ready(120)
        wait_until(lambda: probed.status() == 1, timeout=20)
        assert _scene(probed.stub, images[0]).model_version == old
    finally:
        ranker_channel.close()
        loop.call(ranker.stop(grace=1))
        probed.close()
        unprobed.close()
        server.stop()


FAKE = encoders(input_size=8, regions=4, embedding_dim=4)  # what the fake Triton serves


def _fake_config(model: str, version: str) -> model_config_pb2.ModelConfig:
    spec = FAKE[model]
    text = f'''
        name: "{model}" max_batch_size: 8
        input {{ name: "{INPUT}" data_type: TYPE_UINT8 dims: [8, 8, 3] }}
        parameters {{ key: "model_version" value {{ string_value: "{version}" }} }}
    ''' + "".join(
        f'output {{ name: "{t.name}" data_type: TYPE_FP32 dims: {list(t.dims)} }}' for t in spec.outputs
    )
    return text_format.Parse(text, model_config_pb2.ModelConfig())


class FakeTriton:
    """tritonclient.grpc.aio's calls the backend makes, with a model version the test switches, a log of
    the calls in order, and a gate that holds config reads (to see which answers a read vouches for)."""

    def __init__(self, version: str):
        self.version = version
        self.calls: list[str] = []
        self.config_gate = asyncio.Event()
        self.config_gate.set()

    async def is_model_ready(self, model, client_timeout=None):
        return True

    async def get_model_config(self, model, client_timeout=None):
        self.calls.append(f"config {model}")
        await self.config_gate.wait()
        return service_pb2.ModelConfigResponse(config=_fake_config(model, self.version))

    async def infer(self, model, inputs, outputs=None, client_timeout=None):
        await asyncio.sleep(0)
        self.calls.append(f"infer {model}")
        batch = inputs[0]._get_tensor().shape[0]
        shapes = {t.name: t.dims for t in FAKE[model].outputs}

        class Result:
            def as_numpy(self, name):
                return np.zeros((batch, *shapes[name]), np.float32)

        return Result()

    async def close(self):
        pass


async def _started(fake: FakeTriton) -> TritonBackend:
    backend = TritonBackend("fake:8001", timeout_s=1)
    backend._client = fake
    await backend.start()
    fake.calls.clear()
    return backend


def test_each_batch_is_confirmed_by_a_config_read_sent_after_its_answer():
    """The per-batch check without a server: batches that finish together share one config read; a read
    already sent when a batch finishes does not vouch for it (it needs the next); a model that changed
    between the answer and the read fails the batch with ModelChanged, then every call and `info`, and
    ready() is False until the config is the started one again."""

    async def scenario() -> None:
        fake = FakeTriton("v1")
        backend = await _started(fake)
        images = np.zeros((2, 8, 8, 3), np.uint8)

        await asyncio.gather(*(backend.encode_products(images) for _ in range(4)))
        assert fake.calls == [f"infer {PRODUCT_ENCODER}"] * 4 + [f"config {PRODUCT_ENCODER}"]

        fake.calls.clear()
        fake.config_gate.clear()
        first = asyncio.ensure_future(backend.encode_scenes(images[:1]))
        while fake.calls != [f"infer {SCENE_ENCODER}", f"config {SCENE_ENCODER}"]:
            await asyncio.sleep(0)  # the first batch's read is sent and held
        second = asyncio.ensure_future(backend.encode_scenes(images[:1]))
        while len(fake.calls) < 4:
            await asyncio.sleep(0)
        assert fake.calls[2:] == [f"infer {SCENE_ENCODER}", f"config {SCENE_ENCODER}"]  # its own read
        fake.config_gate.set()
        await asyncio.gather(first, second)

        fake.calls.clear()
        answered = asyncio.ensure_future(backend.encode_scenes(images[:1]))
        while fake.calls != [f"infer {SCENE_ENCODER}"]:
            await asyncio.sleep(0)
        fake.version = "v2"  # Triton reloaded between the answer and the read
        with pytest.raises(ModelChanged, match=r"'v2'.*'v1'.*restart the encoder"):
            await answered
        with pytest.raises(ModelChanged):
            assert backend.info
        with pytest.raises(ModelChanged):
            await backend.encode_products(images)
        assert not await backend.ready()

        fake.version = "v1"
        assert await backend.ready()
        assert backend.info.model_version == "v1"
        await backend.encode_products(images)
        await backend.close()

    asyncio.run(scenario())


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
            attention_keys = np.stack(
                [product_from_proto(r.embedding, info.embedding_dim)[1] for r in embedded]
            )
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
                    d = hybrid_distances(*scene, styles[idx], attention_keys[idx]).hybrid
                    order = np.argsort(d, kind="stable")[:5]
                    assert [p.product_id for p in result.products] == [products[idx[i]][0] for i in order]
                    np.testing.assert_allclose([p.distance for p in result.products], d[order], atol=1e-5)
                    assert result.certified
    finally:
        loop.call(ranker.stop(grace=1))
