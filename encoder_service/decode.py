"""Encoded image bytes -> the model's input pixels, with the limits checked before any pixel is decoded.

The pixels come from `style_model.data.images.decode`, the function training used, so the served model
sees what it was trained on. Pure and thread-safe: the service runs it in a thread pool.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from encoder_service.errors import ImageError, ImageTooLarge
from style_model.data.images import decode

# The formats the API promises (encoder.proto; Pillow's JPEG opener also takes phone MPO files). Anything
# else (EPS, which would start Ghostscript, PSD, ICO, ...) is refused before a plugin parses it.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"
_PIXELS_IN_MESSAGE = re.compile(r"\((\d+) pixels\)")


def pixel_limit(max_pixels: int) -> int:
    """The limit in force: ours, or Pillow's MAX_IMAGE_PIXELS when lower (over it Pillow warns of a
    decompression bomb, and we refuse rather than decode)."""
    pillow = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow is None else min(max_pixels, int(pillow))


def decode_image(data: bytes, size: int, max_bytes: int, max_pixels: int) -> np.ndarray:
    """uint8 [size, size, 3] RGB of an encoded image (first frame if animated).

    Raises ImageError for empty, corrupt, truncated or unsupported data and ImageTooLarge when `data` is
    over `max_bytes` or the image over `max_pixels` (checked from the header, before decoding).
    """
    if not data:
        raise ImageError("empty image: no bytes were sent")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image too large: {len(data)} bytes, over the limit of {max_bytes} bytes")
    limit = pixel_limit(max_pixels)
    try:
        # open() reads the header only; the pixels are decoded by decode() below
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > limit:
                raise ImageTooLarge(
                    f"image too large: {width}x{height} = {width * height} pixels, "
                    f"over the limit of {limit} pixels"
                )
            return decode(image, size)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses far over its own limit while opening, before we see the size
        found = _PIXELS_IN_MESSAGE.search(str(exc))
        actual = f"{found.group(1)} pixels" if found else str(exc)
        raise ImageTooLarge(f"image too large: {actual}, over the limit of {limit} pixels") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(
            f"cannot decode image: not an image in a supported format ({_FORMAT_NAMES}); "
            f"{len(data)} bytes of {_kind(data)}"
        ) from exc
    except Exception as exc:  # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _kind(data: bytes) -> str:
    """What unreadable bytes look like, without quoting them (an error report may travel further than the
    file: a catalog's path to /proc/self/environ would hand over the tokens it starts with)."""
    head = data[:512].lstrip()
    if head[:1] == b"<":
        return "markup (an HTML or XML page?)"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "text"
    return "binary data"
