"""The encoder service: image decoding, micro-batching and config as plain functions, then real servers
on loopback (port 0) with a real channel.

pytest-asyncio is not installed: servers run on an event loop in a background thread, the tests call them
through a plain synchronous grpc channel, and both are closed in teardown.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import struct
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

import encoder_service.decode as decode_module
from ctl.encoder_contract import PRODUCT_ENCODER, SCENE_ENCODER, model_file
from ctl.tensors import product_from_proto, scene_from_proto
from ctl.v1 import encoder_pb2
from encoder_service.batcher import MicroBatcher
from encoder_service.cli import add_parser, main
from encoder_service.config import EncoderConfig, from_args
from encoder_service.decode import decode_image
from encoder_service.errors import BackendUnavailable, ConfigError, ImageError, ImageTooLarge, Overloaded
from encoder_service.service import SERVICE_NAME
from style_model.data.images import PAD_COLOUR, load_image
from style_model.export import load_encoder
from tests.servers import Encoder
from tests.servers import encoder_config as _config
from tests.servers import wait_until as _wait_until

SIZE, REGIONS, EMBEDDING_DIM = 64, 4, 32  # the exported_repo fixture's model
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------- images


def _encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _photo(seed: int, size: tuple[int, int] = (80, 56), fmt: str = "PNG") -> bytes:
    """A smooth random picture (distinct per seed), encoded."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return _encode(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR), fmt)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width × height, with a tiny IDAT: a decompression bomb's
    header. Decoding it would allocate width × height × 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _decode(data: bytes, max_bytes: int = 10**7, max_pixels: int = 10**7) -> np.ndarray:
    return decode_image(data, SIZE, max_bytes, max_pixels)


# ---------------------------------------------------------------- decode_image


@pytest.mark.parametrize(
    ("mode", "fmt", "colour", "expected", "tolerance"),
    [
        ("RGB", "PNG", (200, 30, 60), (200, 30, 60), 0),
        ("RGBA", "PNG", (10, 200, 30, 0), (255, 255, 255), 0),  # transparent: on white, hidden colour gone
        ("RGBA", "PNG", (10, 200, 30, 128), (132, 227, 142), 1),  # half transparent: blended with white
        ("L", "PNG", 100, (100, 100, 100), 0),
        ("P", "PNG", 5, None, 0),
        ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0), 8),
        ("RGB", "JPEG", (200, 30, 60), (200, 30, 60), 8),
        ("RGB", "WEBP", (200, 30, 60), (200, 30, 60), 8),
        ("RGB", "GIF", (200, 30, 60), (200, 30, 60), 0),
        ("RGB", "BMP", (200, 30, 60), (200, 30, 60), 0),
        ("RGB", "TIFF", (200, 30, 60), (200, 30, 60), 0),
    ],
)
def test_decode_modes_and_formats(mode, fmt, colour, expected, tolerance):
    image = Image.new(mode, (40, 40), colour)
    if mode == "P":
        image.putpalette([0, 0, 0] * 5 + [20, 40, 250] + [0, 0, 0] * 250)
        expected = (20, 40, 250)
    pixels = _decode(_encode(image, fmt))
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - expected).max() <= tolerance


def test_decode_one_pixel_and_letterbox():
    assert (_decode(_encode(Image.new("RGB", (1, 1), (5, 6, 7)))) == (5, 6, 7)).all()
    wide = _decode(_encode(Image.new("RGB", (64, 32), (250, 0, 0))))
    assert (wide[2, SIZE // 2] == PAD_COLOUR).all()  # padded above and below
    assert (wide[SIZE // 2, 2] == (250, 0, 0)).all()


def test_decode_applies_exif_orientation():
    # stored 60×30, left half red, right half blue; orientation 6 = shown rotated 90° clockwise,
    # so the red half is on top and the blue half at the bottom
    stored = Image.new("RGB", (60, 30), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = _decode(_encode(stored, "JPEG", exif=exif, quality=95)).astype(int)
    top, bottom = pixels[SIZE // 4, SIZE // 2], pixels[3 * SIZE // 4, SIZE // 2]
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom


def test_decode_animated_takes_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert (_decode(data) == (255, 0, 0)).all()


def test_decode_gives_the_training_pixels(synth_dir):
    path = sorted((synth_dir / "images").iterdir())[0]
    assert np.array_equal(_decode(path.read_bytes()), load_image(path, SIZE))


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        pytest.param(b"", ImageError, "empty image", id="empty"),
        pytest.param(np.random.default_rng(0).bytes(999), ImageError, "supported format", id="random-bytes"),
        pytest.param(
            _photo(1, (300, 200), "JPEG")[:1500], ImageError, "cannot decode image", id="truncated-jpeg"
        ),
        pytest.param(_encode(Image.new("RGB", (8, 8)), "PPM"), ImageError, "supported format", id="ppm"),
        pytest.param(
            bytes(10**7 + 1), ImageTooLarge, "10000001 bytes, over the limit of 10000000", id="bytes"
        ),
        pytest.param(
            _encode(Image.new("RGB", (4000, 3000))), ImageTooLarge, "4000x3000 = 12000000", id="pixels"
        ),
        pytest.param(_png_header_only(50000, 50000), ImageTooLarge, "2500000000 pixels", id="bomb-header"),
    ],
)
def test_decode_rejects(data, error, message, monkeypatch):
    decoded: list[tuple[int, int]] = []
    real = decode_module.decode
    monkeypatch.setattr(
        decode_module, "decode", lambda image, size: decoded.append(image.size) or real(image, size)
    )
    with pytest.raises(error, match=message):
        _decode(data, max_pixels=10**7)
    if error is ImageTooLarge:
        assert decoded == []  # refused from the byte count or the header: no pixel was decoded


def test_decode_checks_pixels_before_decoding():
    pillow_limit = Image.MAX_IMAGE_PIXELS
    # 8000 × 8000 is under Pillow's own limit, over ours: refused from the header, no 192 MB allocation
    with pytest.raises(ImageTooLarge, match="8000x8000 = 64000000 pixels, over the limit of 40000000"):
        _decode(_png_header_only(8000, 8000), max_pixels=40_000_000)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # Pillow's global is left alone


# ---------------------------------------------------------------- MicroBatcher (no gRPC, no model)
# The order of events is set by gates and event-loop turns, never by sleeping: no outcome depends on how
# fast the machine is. (More in tests/test_batcher.py: cancellations in every position.)


async def _turns(n: int = 20) -> None:
    """Lets every task that is ready run: `n` event-loop turns, no clock."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_batcher_splits_merges_and_drops_cancelled_requests():
    async def scenario() -> None:
        sizes: list[int] = []

        async def forward(images: np.ndarray) -> tuple[np.ndarray, ...]:
            sizes.append(len(images))
            return (images[:, 0] * 10,)

        # an hour's wait: a pass starts when its batch is full or the next request does not fit, never
        # on a timer, so nothing below depends on how fast the machine is
        batcher = MicroBatcher("t", forward, max_batch=8, max_wait_s=3600.0, max_queue=64)
        batcher.start()
        abandoned = asyncio.create_task(batcher.submit(np.ones((2, 1))))
        await _turns()
        assert not batcher._queue and sizes == []  # taken into the forming batch, not started
        abandoned.cancel()
        rows = np.arange(24, dtype=float)[:, None]
        kept, big = await asyncio.gather(batcher.submit(np.full((3, 1), 7.0)), batcher.submit(rows))
        assert sizes == [3, 8, 8, 8]  # the cancelled request's 2 images never ran
        assert np.array_equal(kept[0], [70.0] * 3)
        assert np.array_equal(big[0], np.arange(24) * 10.0)  # split over passes, joined in order
        assert batcher.pending_images == 0
        await batcher.close()

    asyncio.run(scenario())


def test_batcher_workers_run_passes_concurrently():
    """With workers=3 (the Triton backend's setting) three full batches are in flight at once; with one
    worker they run one after another."""

    async def peak_in_flight(workers: int) -> int:
        in_flight, peak = 0, 0
        gate = asyncio.Event()  # the passes are held until every one that can start has started

        async def forward(images: np.ndarray) -> tuple[np.ndarray, ...]:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await gate.wait()
            in_flight -= 1
            return (images * 2,)

        batcher = MicroBatcher("t", forward, max_batch=4, max_wait_s=0.0, max_queue=64, workers=workers)
        batcher.start()
        calls = asyncio.gather(*(batcher.submit(np.full((4, 1), float(i))) for i in range(3)))
        await _turns()
        gate.set()
        outs = await calls
        assert [float(o[0][0, 0]) for o in outs] == [0.0, 2.0, 4.0]
        await batcher.close()
        return peak

    assert asyncio.run(peak_in_flight(3)) == 3
    assert asyncio.run(peak_in_flight(1)) == 1


def test_batcher_refuses_at_once_what_cannot_finish_before_the_deadline():
    """At the rate the passes ran (whatever this machine gives), with 4 images queued: a call whose
    deadline is half the time the queue needs is refused at once with the numbers; one with twice that time
    is accepted and served. The passes are held at a gate meanwhile, so "at once" needs no clock: the
    refusal came while nothing could leave the queue."""

    async def scenario() -> None:
        gate = asyncio.Event()
        gate.set()

        async def forward(images: np.ndarray) -> tuple[np.ndarray, ...]:
            await gate.wait()
            return (images * 2,)

        batcher = MicroBatcher("t", forward, max_batch=1, max_wait_s=0.0, max_queue=64)
        batcher.start()
        await batcher.submit(np.ones((1, 1)), remaining_s=5.0)  # measures the rate
        rate = batcher.images_per_s
        assert rate is not None
        gate.clear()
        queued = [asyncio.create_task(batcher.submit(np.ones((1, 1)))) for _ in range(5)]
        await _turns()
        assert batcher.pending_images == 4  # one in a pass held at the gate, four waiting
        needs = (4 + 1) / rate  # seconds for the queue and one more image at that rate
        refused = asyncio.create_task(batcher.submit(np.ones((1, 1)), remaining_s=needs / 2))
        await _turns()
        assert refused.done()
        with pytest.raises(
            Overloaded,
            match=r"cannot finish 1 images within the call's deadline .*: 4 images are queued ahead",
        ):
            refused.result()
        late = asyncio.create_task(batcher.submit(np.full((1, 1), 3.0), remaining_s=needs * 2))
        await _turns()
        assert not late.done() and batcher.pending_images == 5  # accepted: waits its turn
        gate.set()
        assert float((await late)[0][0, 0]) == 6.0
        await asyncio.gather(*queued)
        await batcher.close()

    asyncio.run(scenario())


def test_batcher_gives_a_backend_error_to_every_request_of_the_batch():
    async def scenario() -> None:
        async def forward(images: np.ndarray) -> tuple[np.ndarray, ...]:
            raise BackendUnavailable("the model went away")

        batcher = MicroBatcher("t", forward, max_batch=8, max_wait_s=3600.0, max_queue=64)
        batcher.start()
        outcomes = await asyncio.gather(
            *(batcher.submit(np.ones((n, 1))) for n in (1, 2, 5)), return_exceptions=True
        )  # 8 images: one full batch, it runs at once
        assert all(isinstance(o, BackendUnavailable) for o in outcomes), outcomes
        assert batcher.forward_passes == 1
        waiting = asyncio.create_task(batcher.submit(np.ones((1, 1))))
        await _turns()  # in a forming batch, waiting (an hour) for more images
        await batcher.close()  # what is still waiting is failed, not left hanging
        with pytest.raises(BackendUnavailable, match="shutting down"):
            await waiting

    asyncio.run(scenario())


# ---------------------------------------------------------------- config and CLI


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ctl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve-encoder", *argv])


def test_config_flag_beats_environment_beats_default():
    args = _cli(["--port", "7000", "--max-batch", "4", "--model-repo", "/models"])
    env = {"CTL_ENCODER_PORT": "7001", "CTL_ENCODER_MAX_QUEUE": "9", "CTL_ENCODER_BACKEND": "triton"}
    config = from_args(args, env)
    assert (config.port, config.max_batch, config.max_queue, config.backend) == (7000, 4, 9, "triton")
    assert config.model_repo == Path("/models")
    assert (config.metrics_port, config.grace_s, config.max_image_bytes) == (9464, 10.0, 20 * 1024 * 1024)
    assert config.max_images_per_call == 16
    assert args.func is main


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="CTL_ENCODER_PORT='http'"):
        from_args(_cli([]), {"CTL_ENCODER_PORT": "http"})
    with pytest.raises(ConfigError, match="CTL_ENCODER_BACKEND='onnx'"):
        from_args(_cli([]), {"CTL_ENCODER_BACKEND": "onnx"})
    with pytest.raises(ConfigError, match="max_batch=0"):
        EncoderConfig(max_batch=0)
    with pytest.raises(SystemExit):
        _cli(["--backend", "onnx"])


def test_cli_fails_cleanly_without_a_model(tmp_path, caplog):
    args = _cli(["--model-repo", str(tmp_path), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"])
    assert main(args) == 1
    assert f"no exported {SCENE_ENCODER}" in caplog.text


# ---------------------------------------------------------------- servers on loopback


def _error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def encoder(loop, exported_repo) -> Iterator[Encoder]:
    """The shared server: small batches and limits so that the tests can reach them."""
    config = _config(exported_repo, metrics_port=0, max_batch=8, max_wait_ms=20, max_image_bytes=200_000)
    server = Encoder(loop, config)
    try:
        yield server.wait_serving()
    finally:
        server.close()


@pytest.fixture
def start_encoder(loop, exported_repo) -> Iterator[Callable[..., Encoder]]:
    """Starts servers with other settings; all are stopped in teardown."""
    started: list[Encoder] = []

    def start(health_poll_s: float = 5.0, **overrides: Any) -> Encoder:
        started.append(Encoder(loop, _config(exported_repo, **overrides), health_poll_s))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def modules(exported_repo) -> dict[str, Any]:
    """The exported TorchScript encoders, loaded directly (the reference for the served embeddings)."""
    scene, meta = load_encoder(model_file(exported_repo, SCENE_ENCODER))
    product, _ = load_encoder(model_file(exported_repo, PRODUCT_ENCODER))
    return {"scene": scene, "product": product, "version": meta["model_version"]}


def _direct(module: torch.jit.ScriptModule, data: bytes) -> tuple[np.ndarray, ...]:
    pixels = _decode(data)
    with torch.inference_mode():
        return tuple(t[0].numpy() for t in module(torch.from_numpy(pixels.copy())[None]))


def _products(stub, images: list[bytes]) -> encoder_pb2.EncodeProductsResponse:
    return stub.EncodeProducts(encoder_pb2.EncodeProductsRequest(images=images), timeout=30)


def _scene(stub, image: bytes) -> encoder_pb2.EncodeSceneResponse:
    return stub.EncodeScene(encoder_pb2.EncodeSceneRequest(image=image), timeout=30)


def test_health_and_reflection(encoder):
    assert encoder.status("") == SERVING
    assert encoder.status(SERVICE_NAME) == SERVING
    database = ProtoReflectionDescriptorDatabase(encoder.channel)
    services = set(database.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    service = descriptor_pool.DescriptorPool(database).FindServiceByName(SERVICE_NAME)
    assert {m.name for m in service.methods} == {"EncodeScene", "EncodeProducts", "GetModelInfo"}


def test_model_info(encoder, exported_repo):
    info = encoder.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10)
    summary = json.loads((exported_repo / "model_info.json").read_text())
    assert info.model_version == summary["model_version"]
    assert (info.input_size, info.grid, info.regions, info.embedding_dim) == (SIZE, 2, REGIONS, EMBEDDING_DIM)
    assert info.backend == "torchscript"
    assert (info.max_batch_images, info.max_image_bytes, info.max_image_pixels) == (32, 200_000, 40_000_000)
    assert json.loads(info.model_config_json) == summary["config"]


def test_encode_scene_equals_the_torchscript_module(encoder, modules):
    data = _photo(1, (90, 60), "JPEG")
    embedding = _scene(encoder.stub, data).embedding
    scene = scene_from_proto(embedding, REGIONS, EMBEDDING_DIM)  # checks shapes [D], [R, D], [R, D]
    assert scene.global_.shape == (EMBEDDING_DIM,) and scene.local.shape == scene.attention.shape == (
        REGIONS,
        EMBEDDING_DIM,
    )
    for served, direct in zip(scene, _direct(modules["scene"], data)):
        np.testing.assert_allclose(served, direct, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(served, axis=-1), 1.0, atol=1e-5)
    assert embedding.model_version == modules["version"]


def test_encode_products_equals_single_calls(encoder, modules):
    images = [_photo(10 + i) for i in range(20)]  # more than max_batch (8): several forward passes
    batch = _products(encoder.stub, images)
    assert batch.model_version == modules["version"]
    assert len(batch.results) == len(images)
    for result, data in zip(batch.results, images):
        single = _products(encoder.stub, [data]).results[0]
        style, attention_key = product_from_proto(result.embedding, EMBEDDING_DIM)
        np.testing.assert_allclose(style, product_from_proto(single.embedding, EMBEDDING_DIM)[0], atol=1e-5)
        np.testing.assert_allclose(
            attention_key, product_from_proto(single.embedding, EMBEDDING_DIM)[1], atol=1e-5
        )
        assert result.embedding.model_version == modules["version"]
    direct_style, direct_key = _direct(modules["product"], images[0])
    np.testing.assert_allclose(
        product_from_proto(batch.results[0].embedding, EMBEDDING_DIM)[0], direct_style, atol=1e-5
    )
    np.testing.assert_allclose(
        product_from_proto(batch.results[0].embedding, EMBEDDING_DIM)[1], direct_key, atol=1e-5
    )


def test_a_bad_image_fails_only_its_own_result(encoder, modules):
    images = [_photo(30), _photo(31), b"not an image at all", _photo(32), _photo(33)]
    reply = _products(encoder.stub, images)
    assert [r.WhichOneof("result") for r in reply.results] == ["embedding"] * 2 + ["error"] + [
        "embedding"
    ] * 2
    assert reply.results[2].error.code == "INVALID_ARGUMENT"
    assert "cannot decode image" in reply.results[2].error.message
    style, _ = product_from_proto(reply.results[3].embedding, EMBEDDING_DIM)
    np.testing.assert_allclose(style, _direct(modules["product"], images[3])[0], atol=1e-5)


def test_concurrent_calls_share_forward_passes(start_encoder):
    """16 concurrent calls, batches of 8 that wait (up to an hour) until full: exactly 2 forward passes,
    whatever the order and speed in which the calls arrive."""
    encoder = start_encoder(max_batch=8, max_wait_ms=3_600_000).wait_serving()
    registry = encoder.server.metrics.registry

    def batches() -> tuple[float, float]:
        labels = {"encoder": "scene"}
        return (
            registry.get_sample_value("ctl_encoder_batch_images_count", labels) or 0.0,
            registry.get_sample_value("ctl_encoder_batch_images_sum", labels) or 0.0,
        )

    passes_before, (count_before, sum_before) = encoder.app.scenes.forward_passes, batches()
    request = encoder_pb2.EncodeSceneRequest(image=_photo(40))
    calls = [encoder.stub.EncodeScene.future(request, timeout=30) for _ in range(16)]
    versions = {call.result().embedding.model_version for call in calls}
    assert len(versions) == 1
    assert encoder.app.scenes.forward_passes - passes_before == 2
    count_after, sum_after = batches()
    assert (count_after - count_before, sum_after - sum_before) == (2, 16)


def test_metrics_endpoint(encoder):
    _scene(encoder.stub, _photo(41))
    port = encoder.server.metrics.http_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'ctl_encoder_forward_passes_total{encoder="scene"}' in text
    assert "ctl_encoder_batch_images_bucket" in text
    calls = [line for line in text.splitlines() if line.startswith("ctl_grpc_requests_total{")]
    assert any('method="EncodeScene"' in line and 'code="OK"' in line for line in calls), calls


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "empty image", id="empty"),
        pytest.param(np.random.default_rng(1).bytes(5000), "supported format", id="random-bytes"),
        pytest.param(_photo(2, (300, 200), "JPEG")[:1500], "cannot decode image", id="truncated-jpeg"),
        pytest.param(
            b"\xff\xd8" + bytes(200_000), "200002 bytes, over the limit of 200000 bytes", id="too-many-bytes"
        ),
        pytest.param(
            _png_header_only(50000, 50000), "2500000000 pixels, over the limit of", id="bomb-header"
        ),
    ],
)
def test_bad_scene_image_is_invalid_argument(encoder, data, message):
    error = _error(lambda: _scene(encoder.stub, data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert _scene(encoder.stub, _photo(3)).embedding.model_version  # the server is fine


def test_too_many_images_is_invalid_argument(encoder):
    image = _photo(4, (16, 16))
    error = _error(lambda: _products(encoder.stub, [image] * 33))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "33 images" in error.details() and "at most 32" in error.details()
    assert len(_products(encoder.stub, [image] * 32).results) == 32


def test_full_queue_is_resource_exhausted_at_once(start_encoder):
    """3 images wait in a batch of 4 that waits (up to an hour) for a 4th: 2 more are refused at once,
    while the batch has not run (no clock needed to tell "at once"); 1 more fills it and both are served."""
    server = start_encoder(max_batch=4, max_wait_ms=3_600_000, max_queue=4).wait_serving()
    images = [_photo(50 + i) for i in range(4)]
    first = server.stub.EncodeProducts.future(
        encoder_pb2.EncodeProductsRequest(images=images[:3]), timeout=60
    )
    _wait_until(lambda: server.app.products.pending_images == 3, timeout=60)  # waiting for a 4th image
    error = _error(lambda: _products(server.stub, images[:2]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 4" in error.details()
    assert not first.done()  # refused at once, not after the batch ran
    assert _products(server.stub, images[3:]).results[0].WhichOneof("result") == "embedding"
    assert [r.WhichOneof("result") for r in first.result().results] == ["embedding"] * 3


def test_calls_that_time_out_or_are_cancelled_leave_no_queue_behind(start_encoder):
    """Issue 14, item 1, through gRPC: a flood of calls whose deadlines pass while they wait (or whose
    clients go away) among ordinary ones, against a small queue. Every ordinary call is answered (served,
    or refused at once while the queue is full: never lost), the queue gauge returns to 0, and afterwards
    ordinary calls all succeed (before the fix, lost requests held the queue full for ever)."""
    server = start_encoder(max_batch=4, max_wait_ms=0, max_queue=24).wait_serving()
    registry = server.server.metrics.registry
    scene = encoder_pb2.EncodeSceneRequest(image=_photo(70))
    products = encoder_pb2.EncodeProductsRequest(images=[_photo(71 + i) for i in range(3)])
    ordinary, short, dropped = [], [], []
    for i in range(400):
        kind, call = i % 5, server.stub.EncodeScene if i % 2 else server.stub.EncodeProducts
        request = scene if i % 2 else products
        if kind == 0:
            ordinary.append(call.future(request, timeout=30))
        elif kind == 4:
            dropped.append(call.future(request, timeout=60))
        else:
            short.append(call.future(request, timeout=0.002 * (1 + i % 13)))
        if kind == 4 and i % 3 == 0:
            for future in dropped[-3:]:
                future.cancel()  # the client goes away mid-call
    codes = {grpc.StatusCode.OK: 0, grpc.StatusCode.RESOURCE_EXHAUSTED: 0}
    for future in ordinary:
        code = future.code()
        assert code in codes, f"an ordinary call ended {code}: {future.details()}"
        codes[code] += 1
    for future in short:
        assert future.code() in (
            grpc.StatusCode.OK,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), future.details()
    for future in dropped:
        future.cancel()

    def queued() -> dict[str, float | None]:
        return {
            e: registry.get_sample_value("ctl_encoder_queue_images", {"encoder": e})
            for e in ("scene", "product")
        }

    _wait_until(lambda: queued() == {"scene": 0, "product": 0}, timeout=60)  # only bounds a failure
    for i in range(12):  # ordinary calls after the flood: all served
        if i % 2:
            assert _scene(server.stub, _photo(80 + i)).embedding.model_version
        else:
            assert [r.WhichOneof("result") for r in _products(server.stub, products.images).results] == [
                "embedding"
            ] * 3
    assert (server.app.scenes.pending_images, server.app.products.pending_images) == (0, 0)
    assert queued() == {"scene": 0, "product": 0}


def test_graceful_shutdown_finishes_the_call_in_flight(start_encoder):
    """A call waits in a batch of 2 (up to an hour, so it is surely in flight when the stop comes); the
    server drains: new calls are refused, and the call finishes OK once a second image (put straight into
    the batcher: no new call can come in) fills its batch."""
    server = start_encoder(max_batch=2, max_wait_ms=3_600_000, grace_s=60).wait_serving()
    call = server.stub.EncodeScene.future(encoder_pb2.EncodeSceneRequest(image=_photo(60)), timeout=60)
    _wait_until(lambda: server.app.scenes.pending_images == 1, timeout=60)  # waiting in the batcher
    server.request_stop()

    def draining() -> bool:
        try:
            reply = server.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return True
        return reply.status != SERVING

    _wait_until(draining, timeout=60)
    assert not call.done()  # still in flight during the drain
    server.loop.call(server.app.scenes.submit(_decode(_photo(61))[None]))
    assert call.result().embedding.model_version  # completed OK during the drain
    server.task.result(timeout=30)  # serve returned cleanly
    error = _error(lambda: server.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=2))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_not_serving_until_the_backend_answers(start_encoder):
    from tritonclient.utils import InferenceServerException

    # a "Triton" that accepts TCP connections and never answers: the backend's start waits on it
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"127.0.0.1:{silent.getsockname()[1]}"
        # the fake Triton never answers while the test looks; then it goes away (end of `with`), which
        # fails the start at once: nothing depends on how long the checks below take
        server = start_encoder(backend="triton", triton_url=url, triton_timeout_s=300)
        assert server.status("") == NOT_SERVING
        assert server.status(SERVICE_NAME) == NOT_SERVING
        error = _error(lambda: server.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=2))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "not loaded yet" in error.details()
        assert not server.task.done()  # still waiting on Triton
    with pytest.raises(BackendUnavailable, match=f"Triton at {url}") as failure:
        server.task.result(timeout=120)
    assert isinstance(failure.value.__cause__, InferenceServerException)
