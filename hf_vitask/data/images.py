"""Any PIL image to the 8-bit RGB every processor and timm transform expects.

PIL's ``convert("RGB")`` clips 16-bit, 32-bit integer and float images to 0..255: a 16-bit scan
(common in medical imaging: DICOM exports, microscopy) becomes almost uniformly white. Such
images are scaled to 8 bits by their own value range instead (minimum -> 0, maximum -> 255),
which keeps the order of every pixel value; a constant image becomes black.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

#: The image files ``hf-vitask predict`` picks up in a directory.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

__all__ = ["load_image", "to_rgb"]


def _high_depth(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;16")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as a new 8-bit RGB image (decoded now: the source file may be closed after);
    high-bit-depth images are min-max scaled, never clipped."""
    if image.mode == "RGB":
        return image.copy()
    if _high_depth(image.mode):
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ValueError(f"the {image.mode!r} image holds NaN or inf pixel values")
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) * 255.0 if high > low else np.zeros_like(pixels)
        image = Image.fromarray(np.round(scaled).astype(np.uint8))  # mode "L"
    return image.convert("RGB")


def load_image(value: Any, where: str) -> Image.Image:
    """Accept a PIL image, a path, or a datasets ``{"path", "bytes"}`` dict; fail naming the row.
    Returns 8-bit RGB (16-bit and float images scaled by their value range: :func:`to_rgb`)."""
    if isinstance(value, dict) and value.get("bytes") is None:
        value = value.get("path")
    if value is None:
        raise ValueError(f"Missing image{where}")
    # Never put raw bytes in the message: a corrupt 5 MB image would make a 20 MB error.
    shown = f"<{len(value['bytes'])} bytes>" if isinstance(value, dict) else repr(value)
    try:
        if isinstance(value, Image.Image):  # may be lazily loaded: decoding can fail here too
            return to_rgb(value)
        if isinstance(value, dict):
            import io

            return to_rgb(Image.open(io.BytesIO(value["bytes"])))
        with Image.open(value) as img:
            return to_rgb(img)
    except FileNotFoundError:
        raise ValueError(f"Image file not found{where}: {shown}") from None
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"Cannot read image{where} ({shown}): {e}") from None
