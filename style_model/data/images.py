"""Image loading and the model's geometric preprocessing: crop, letterbox to a square, resize.

Letterboxing (padding to a square with the mean colour before resizing) keeps the scale of textures
the same in a full scene, in a crop of it, and in a product photo. The same function serves training,
evaluation and the encoder service, so the model sees identical pixels everywhere.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# ImageNet mean colour: padding with it is zero after normalisation
PAD_COLOUR = (124, 116, 104)


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
    image = ImageOps.exif_transpose(image)
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


def load_image(path: Path, size: int, crop=None) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return preprocess(im, size, crop)


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
