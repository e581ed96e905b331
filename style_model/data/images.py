"""Image loading and the model's geometric preprocessing: crop, letterbox to a square, resize.

Letterboxing (padding to a square with the mean colour before resizing) keeps the scale of textures
the same in a full scene, in a crop of it, and in a product photo. The same functions serve training,
evaluation and the encoder service, so the model sees identical pixels everywhere.

A JPEG much larger than the model's input is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
`Image.draft`), never below the input size: at the demo's 96 px that makes decoding 2-3x cheaper, which
matters on CPUs where decoding costs as much as the model (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# ImageNet mean colour: padding with it is zero after normalisation
PAD_COLOUR = (124, 116, 104)
_ORIENTATION = 0x0112  # EXIF tag; 5-8 turn the image by 90 degrees


def crop_box(size: tuple[int, int], crop: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom) of a normalised crop of an image of `size`, at least 1×1."""
    w, h = size
    left, top, right, bottom = crop
    box = (round(left * w), round(top * h), round(right * w), round(bottom * h))
    return box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)


def preprocess(
    image: Image.Image, size: int, crop: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """PIL image -> uint8 [size, size, 3] RGB: EXIF orientation, crop (normalised box), letterbox, resize."""
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF): Pillow's convert("RGB") clips at 255, which makes it white; keep the
        # top 8 bits instead
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # transparent parts (product cut-outs) on white, as product photos are shot, not on whatever colour
        # the hidden pixels happen to hold
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if crop is not None:
        image = image.crop(crop_box(image.size, crop))
    w, h = image.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), PAD_COLOUR)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    if side != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def decode(
    image: Image.Image, size: int, crop: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """An opened, not yet loaded image -> uint8 [size, size, 3]: `draft`, decode, `preprocess`."""
    draft(image, size, crop)
    image.load()
    return preprocess(image, size, crop)


def draft(image: Image.Image, size: int, crop: tuple[float, float, float, float] | None = None) -> None:
    """Lets a JPEG decode at a reduced scale that keeps each side of the (cropped) image >= `size`; a no-op
    for other formats. Call before `load()`."""
    width, height = (1.0, 1.0) if crop is None else (crop[2] - crop[0], crop[3] - crop[1])
    if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
        width, height = height, width  # the crop is of the upright image
    image.draft("RGB", (math.ceil(size / max(width, 1e-3)), math.ceil(size / max(height, 1e-3))))


def load_image(path: Path, size: int, crop=None) -> np.ndarray:
    with Image.open(path) as im:
        return decode(im, size, crop)


def load_many(
    jobs: list[tuple[Path, tuple[float, float, float, float] | None]],
    size: int,
    workers: int = 2,
    progress=None,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode jobs into one uint8 array [N, size, size, 3]; unreadable images stay black and are
    returned as (index, reason) so the caller can report and drop them."""
    out = np.zeros((len(jobs), size, size, 3), dtype=np.uint8)
    failures: list[tuple[int, str]] = []

    def work(i: int) -> None:
        path, crop = jobs[i]
        try:
            out[i] = load_image(path, size, crop)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            failures.append((i, f"{path}: {exc.__class__.__name__}: {exc}"))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, range(len(jobs))):
            if progress is not None:
                progress(1)
    return out, sorted(failures)
