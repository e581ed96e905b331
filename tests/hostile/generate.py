"""Writes the hostile-image corpus next to this file (the files are committed; rerun to regenerate them):

    python tests/hostile/generate.py

Every file is small (the decompression bomb is a 30000×30000 PNG of zeros that compresses to ~100 KB) and
deterministic. tests/test_hostile_images.py holds the outcome each one must get.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def picture(width: int = 80, height: int = 60) -> Image.Image:
    """A colourful RGB test picture (gradients and a block, so that rotations and channels matter)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 7.0)], axis=-1)
    pixels[5:20, 5:30] = (250, 20, 20)
    return Image.fromarray(pixels.astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width × height, then the end: no pixels at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A 1-bit grayscale PNG of side × side zeros: tiny on disk, side² pixels once decoded."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    base = picture()
    jpeg = encoded(base, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: "rotate 90° clockwise to display"
    frames = [picture(), picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gray16 = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    cutout = np.dstack([np.asarray(base), np.full(base.size[::-1], 255, np.uint8)])
    cutout[:, 40:] = (0, 0, 0, 0)  # the right half transparent, its hidden colour black
    return {
        "zero-bytes.jpg": b"",
        "random-bytes.bin": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb.png": png_bomb(30_000),
        "claims-50000x50000.png": png_header_only(50_000, 50_000),
        "text.txt": b"this is not an image\n" * 10,
        "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="80" height="60">'
        b'<rect width="80" height="60" fill="red"/></svg>\n',
        "one-pixel.png": encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "grayscale.png": encoded(base.convert("L"), "PNG"),
        "cmyk.jpg": encoded(base.convert("CMYK"), "JPEG", quality=95),
        "rgba.png": encoded(base.convert("RGBA"), "PNG"),
        "transparent.png": encoded(Image.fromarray(cutout, "RGBA"), "PNG"),
        "gray-16bit.png": encoded(gray16, "PNG"),
        "palette.png": encoded(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "animated.gif": encoded(
            frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0
        ),
        "exif-rotated.jpg": encoded(base.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif),
        "lossless.webp": encoded(base, "WEBP", lossless=True),
    }


if __name__ == "__main__":
    for name, data in corpus().items():
        (HERE / name).write_bytes(data)
        print(f"{name:28s} {len(data):8d} bytes")
