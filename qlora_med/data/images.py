"""Image loading that survives real data: greyscale, 16-bit, palette, RGBA, CMYK, extreme aspect ratios."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from qlora_med.errors import DataError

Image.MAX_IMAGE_PIXELS = 300_000_000  # large pathology figures are legitimate; still bounded
MAX_SIDE = 2048  # images are downscaled to this before squaring; CLIP sees 224-336 px anyway


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        base = Image.new("RGB", img.size, background)
        base.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return base
    return img.convert("RGB")


def load_image(path: str | Path | bytes, background: tuple[int, int, int] = (0, 0, 0),
               record_id: str = "?") -> Image.Image:
    """Open an image file, or encoded image bytes (embedded in parquet), as RGB (transparency composited onto
    ``background``), EXIF rotation applied."""
    embedded = isinstance(path, (bytes, bytearray, memoryview))
    try:
        with Image.open(io.BytesIO(path) if embedded else path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img, background)
    except FileNotFoundError as err:
        raise DataError(f"record {record_id}: image '{path}' not found (check data.image_folder)") from err
    except (OSError, ValueError, SyntaxError) as err:
        what = "embedded image" if embedded else f"image '{path}'"
        raise DataError(
            f"record {record_id}: {what} is unreadable ({err}); replace the file or set "
            "data.on_bad_record: skip"
        ) from err


def to_square(img: Image.Image, aspect: str, background: tuple[int, int, int]) -> Image.Image:
    """``pad``: centre the image on a square of ``background`` (LLaVA-Med v1.5); ``crop``: centre square."""
    if max(img.size) > MAX_SIDE:
        img = img.copy()
        img.thumbnail((MAX_SIDE, MAX_SIDE))  # keeps the aspect ratio; bounds the padded canvas
    w, h = img.size
    if w == h:
        return img
    if aspect == "pad":
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), background)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return canvas
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's normalisation mean as an 8-bit RGB colour (LLaVA's pad colour)."""
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    return tuple(int(round(m * 255)) for m in mean)  # type: ignore[return-value]
