"""Hostile and unusual images (tests/hostile/, made by tests/hostile/generate.py) through a real encoder
server: each gets its defined outcome, a status and a message a person can act on, or the embedding of
the picture it shows. A fuzz test feeds mutated images to the decoder: it returns pixels or raises
ImageError, never anything else, and never hangs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ctl.tensors import product_from_proto
from ctl.v1 import encoder_pb2
from encoder_service.decode import decode_image
from encoder_service.errors import ImageError
from tests.hostile.generate import picture
from tests.servers import Encoder, encoder_config

HOSTILE = Path(__file__).parent / "hostile"
INVALID = "INVALID_ARGUMENT"

# name -> (status, words the message must hold)
REFUSED = {
    "zero-bytes.jpg": (INVALID, "empty image"),
    "random-bytes.bin": (INVALID, "not an image in a supported format"),
    "truncated.jpg": (INVALID, "cannot decode image"),
    "bomb.png": (INVALID, "image too large: 900000000 pixels"),
    "claims-50000x50000.png": (INVALID, "image too large"),
    "text.txt": (INVALID, "not an image in a supported format"),
    "drawing.svg": (INVALID, "not an image in a supported format"),
}


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _decoded(name: str) -> Image.Image:
    image = Image.open(HOSTILE / name)
    image.load()
    return image


def expected_pictures() -> dict[str, bytes]:
    """name -> a plain RGB PNG of what the model must see for it (so the two embeddings must be equal)."""
    gray = np.asarray(_decoded("grayscale.png"))
    gray16 = np.asarray(_decoded("gray-16bit.png")).astype(np.int64) >> 8  # the top 8 bits, not clipped
    upright = np.asarray(_decoded("exif-rotated.jpg").transpose(Image.Transpose.ROTATE_270))
    return {
        "one-pixel.png": _png(np.array([[[10, 200, 30]]])),
        "grayscale.png": _png(np.stack([gray] * 3, axis=-1)),
        "cmyk.jpg": _png(np.asarray(_decoded("cmyk.jpg").convert("RGB"))),
        "rgba.png": _png(np.asarray(picture())),  # all opaque: the picture itself
        "transparent.png": _png(np.where(np.arange(80)[None, :, None] < 40, np.asarray(picture()), 255)),
        "gray-16bit.png": _png(np.stack([gray16] * 3, axis=-1)),
        "palette.png": _png(np.asarray(_decoded("palette.png").convert("RGB"))),
        "animated.gif": _png(np.asarray(_decoded("animated.gif").convert("RGB"))),  # the first frame
        "exif-rotated.jpg": _png(upright),  # shown upright, as a viewer shows it
        "lossless.webp": _png(np.asarray(picture())),
    }


@pytest.fixture(scope="module")
def encoder(loop, exported_repo):
    server = Encoder(loop, encoder_config(exported_repo)).wait_serving()
    yield server
    server.close()


def test_the_corpus_is_what_the_generator_makes():
    from tests.hostile.generate import corpus

    made = corpus()
    on_disk = {p.name for p in HOSTILE.iterdir() if p.suffix != ".py" and p.name != "__pycache__"}
    assert on_disk == set(made)
    for name, data in made.items():
        if name not in ("cmyk.jpg", "exif-rotated.jpg", "truncated.jpg", "animated.gif", "lossless.webp"):
            assert (HOSTILE / name).read_bytes() == data, name  # codecs may differ by version; these not


def test_every_hostile_image_gets_its_defined_outcome(encoder):
    names = sorted(p.name for p in HOSTILE.iterdir() if p.suffix != ".py" and p.name != "__pycache__")
    expected = expected_pictures()
    assert set(names) == set(REFUSED) | set(expected), "an image without a defined outcome"
    references = list(expected)
    images = [(HOSTILE / n).read_bytes() for n in names] + [expected[n] for n in references]
    reply = encoder.stub.EncodeProducts(encoder_pb2.EncodeProductsRequest(images=images), timeout=60)
    results = dict(zip(names + [f"reference:{n}" for n in references], reply.results))
    for name, (code, words) in REFUSED.items():
        result = results[name]
        assert result.WhichOneof("result") == "error", name
        assert result.error.code == code and words in result.error.message, (name, result.error)
    embedding_dim = encoder.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10).embedding_dim
    for name in references:
        got, want = results[name], results[f"reference:{name}"]
        assert got.WhichOneof("result") == "embedding", (name, got.error)
        style, attention_key = product_from_proto(got.embedding, embedding_dim)
        ref_style, ref_attention_key = product_from_proto(want.embedding, embedding_dim)
        np.testing.assert_allclose(style, ref_style, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(attention_key, ref_attention_key, atol=1e-4, err_msg=name)
    # one scene call per refused image: the status of the whole call, and the server keeps serving
    for name in REFUSED:
        with pytest.raises(Exception) as refused:
            encoder.stub.EncodeScene(
                encoder_pb2.EncodeSceneRequest(image=(HOSTILE / name).read_bytes()), timeout=30
            )
        assert refused.value.code().name == INVALID, name
    scene = encoder.stub.EncodeScene(
        encoder_pb2.EncodeSceneRequest(image=expected["lossless.webp"]), timeout=30
    )
    assert scene.embedding.model_version


def _mutations():
    seeds = [(HOSTILE / n).read_bytes() for n in ("cmyk.jpg", "palette.png", "animated.gif", "lossless.webp")]
    seeds.append((HOSTILE / "exif-rotated.jpg").read_bytes())

    @st.composite
    def mutated(draw) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 8))):
            kind = draw(st.sampled_from(["flip", "cut", "splice", "byte"]))
            at = draw(st.integers(0, max(0, len(data) - 1)))
            if kind == "flip" and data:
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif kind == "byte" and data:
                data[at] = draw(st.integers(0, 255))
            elif kind == "cut":
                data = data[:at]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=64))
        return bytes(data)

    return mutated()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_mutations())
def test_mutated_images_decode_or_raise_image_error(data):
    try:
        pixels = decode_image(data, 64, max_bytes=1_000_000, max_pixels=4_000_000)
    except ImageError as exc:
        message = str(exc)
        pixels = None
    if pixels is None:
        assert message  # a message to act on
    else:
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"CTL_TOKEN=s3cr3t-s3cr3t-s3cr3t\nHOME=/root\n", "text"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "markup"),
        (b"\x00\x01SECRETS\xff" * 10, "binary data"),
    ],
)
def test_an_unreadable_image_is_described_never_quoted(data: bytes, kind: str) -> None:
    """Issue 20 #13's sibling: the error echoed the first 8 bytes of what it could not decode, so a
    catalog pointing at /proc/self/environ got the token variable it starts with into the error report."""
    with pytest.raises(ImageError) as error:
        decode_image(data, 64, 1 << 20, 1 << 20)
    message = str(error.value)
    assert kind in message and f"{len(data)} bytes" in message
    assert "CTL_TOKEN" not in message and "SECRET" not in message and "DOCTYPE" not in message
