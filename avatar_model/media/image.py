"""Portrait decoding and resolution buckets.

Every image that enters the pipeline goes through `load_image`, so downstream code only ever sees
upright RGB uint8 arrays, whatever the file format, orientation tag, alpha or bit depth was.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

from common.errors import InputTooLarge, UndecodableImage

# Pillow raises these for truncated, unknown or hostile files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# Area caps (short side -> long-side budget) of the HunyuanVideo-Avatar resolution buckets.
_LONG_SIDE_BUDGET = {704: 1216, 512: 768, 384: 576, 256: 384}


def load_image(data: bytes, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode ``data`` to an upright RGB uint8 array (H, W, 3); alpha is composited over white.

    An image of more than ``max_pixels`` is refused from its header, before any pixel is decoded.
    """
    if not data:
        raise UndecodableImage(f"{name}: cannot decode image: no data")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise InputTooLarge(f"{name}: {width}x{height} is {width * height} pixels, over this run's limit of "
                                    f"{max_pixels} (read from the header; nothing was decoded)")
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except Image.UnidentifiedImageError as exc:  # its message would show a BytesIO repr
        raise UndecodableImage(f"{name}: cannot decode image: not in an image format Pillow reads") from exc
    except _DECODE_ERRORS as exc:
        raise UndecodableImage(f"{name}: cannot decode image: {exc}") from exc


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: Pillow's own convert would clip at 255 instead of rescaling.
        gray = np.asarray(img, dtype=np.float32) / 257.0
        gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def bucket_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) of the HunyuanVideo-Avatar resolution bucket for a ``width`` x ``height`` image.

    Scale so the short side is ``short_side``, snap both sides to multiples of 64, and if the area exceeds
    ``short_side * L`` (L from the official table, else 1.5 * short_side) rescale to fit and snap again.
    """
    if width <= 0 or height <= 0 or short_side <= 0:
        raise ValueError(f"bucket_size needs positive sizes, got {width}x{height}, short side {short_side}")
    scale = short_side / min(width, height)
    new_w = _snap64(width * scale)
    new_h = _snap64(height * scale)
    cap = short_side * _LONG_SIDE_BUDGET.get(short_side, 1.5 * short_side)
    if new_w * new_h > cap:
        scale = math.sqrt(cap / (width * height))
        new_w = _snap64(width * scale)
        new_h = _snap64(height * scale)
    return new_w, new_h


def _snap64(value: float) -> int:
    return max(64, int(round(value / 64)) * 64)


def resize_to_bucket(image: np.ndarray, short_side: int) -> np.ndarray:
    """Lanczos-resize ``image`` to its bucket, keeping the aspect ratio by a centred crop of the overhang."""
    height, width = image.shape[:2]
    bucket_w, bucket_h = bucket_size(width, height, short_side)
    scale = max(bucket_w / width, bucket_h / height)
    cover_w = max(bucket_w, int(round(width * scale)))
    cover_h = max(bucket_h, int(round(height * scale)))
    resized = Image.fromarray(image).resize((cover_w, cover_h), Image.Resampling.LANCZOS)
    left = (cover_w - bucket_w) // 2
    top = (cover_h - bucket_h) // 2
    return np.asarray(resized.crop((left, top, left + bucket_w, top + bucket_h)), dtype=np.uint8).copy()
