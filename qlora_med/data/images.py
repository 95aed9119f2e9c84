"""Image loading that survives real data: greyscale, 16-bit, palette, RGBA, CMYK, extreme aspect ratios, and
images too large to decode (a pixel-count limit instead of raising PIL's global one).

Every path that decodes an image (``data check``, the training collator, eval) goes through :func:`load_image`,
which reads the header first and refuses an image of more than ``max_pixels`` pixels (:class:`ImageTooLarge`, a
record-level error: ``on_bad_record: skip`` drops the record) before decoding a byte of it. Images larger than
:data:`MAX_SIDE` are shrunk to it once when a training source is cached (:func:`shrink_image`), exactly as
:func:`to_square` would shrink them on every draw, so training never decodes them full size again.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from qlora_med.config.sources import MAX_IMAGE_PIXELS
from qlora_med.data.reading import lfs_pointer
from qlora_med.errors import DataError

DEFAULT_MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # data.max_image_pixels' default (why 40 MP: config.sources)
MAX_SIDE = 2048  # images are downscaled to this before squaring; CLIP sees 224-336 px anyway


class ImageError(DataError):
    """A record's image that cannot be used (a record-level problem); ``reason`` counts it, ``detail`` says why."""

    reason = "unreadable_image"

    def __init__(self, record_id: str, detail: str, fix: str = "replace the file or set data.on_bad_record: skip"):
        super().__init__(f"record {record_id}: {detail}; {fix}")
        self.detail = detail

    def __reduce__(self):  # picklable (worker processes) although __init__ takes other arguments
        return _rebuild, (type(self), str(self), self.detail)


def _rebuild(cls: type[ImageError], message: str, detail: str) -> ImageError:
    err = cls.__new__(cls)
    DataError.__init__(err, message)
    err.detail = detail
    return err


class ImageMissing(ImageError):
    reason = "missing_image"


class ImageTooLarge(ImageError):
    """An image over the pixel limit, or one PIL refuses as a decompression bomb."""

    reason = "image_too_large"


def pad_colour(image_mean) -> tuple[int, int, int]:
    """The colour LLaVA pads non-square images with: ``tuple(int(x * 255) for x in image_mean)``.

    Truncated, not rounded, as LLaVA and LLaVA-Med compute it (``expand2square`` in ``llava/mm_utils.py``): CLIP's
    mean (0.4815, 0.4578, 0.4082) gives (122, 116, 104). Training, eval and exported image processors share it.
    """
    return tuple(int(x * 255) for x in image_mean)  # type: ignore[return-value]


def mean_colour(image_processor) -> tuple[int, int, int]:
    """:func:`pad_colour` of a processor's normalisation mean (0.5 each when it has none)."""
    return pad_colour(getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5))


def _normalise(img: Image.Image) -> Image.Image:
    """8-bit L, RGB or RGBA (16-bit and float images stretched to their range; palette and LA as RGBA)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode in ("P", "LA", "RGBA"):
        return img.convert("RGBA")
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    img = _normalise(img)
    if img.mode == "RGBA":
        base = Image.new("RGB", img.size, background)
        base.paste(img, mask=img.getchannel("A"))
        return base
    return img.convert("RGB")


def _describe(path: str | Path | bytes) -> str:
    return "embedded image" if isinstance(path, (bytes, bytearray, memoryview)) else f"image '{path}'"


def _open(path: str | Path | bytes, max_pixels: int, record_id: str) -> Image.Image:
    """The opened (not yet decoded) image, after the pixel check; raises :class:`ImageError`."""
    embedded = isinstance(path, (bytes, bytearray, memoryview))
    what = _describe(path)
    try:
        with warnings.catch_warnings():
            if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):  # the limit is ours; PIL's warning would be noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(path) if embedded else path)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(record_id, f"{what} is refused as a decompression bomb ({err})") from err
    except FileNotFoundError as err:
        raise ImageMissing(record_id, f"image '{path}' not found", "check data.image_folder") from err
    except (OSError, ValueError, SyntaxError) as err:
        head = bytes(path[:200]) if embedded else _first_bytes(path)
        if lfs_pointer(head):
            raise ImageError(record_id, f"{what} is a Git LFS pointer file, not the image (run `git lfs pull` in "
                             "its repository)") from err
        raise ImageError(record_id, f"{what} is unreadable ({err})") from err
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageTooLarge(
            record_id, f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(data.max_image_pixels)",
            "downscale it, raise the limit if it is genuine, or set data.on_bad_record: skip",
        )
    return img


def _first_bytes(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(200)
    except OSError:
        return b""


def image_size(path: str | Path | bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               record_id: str = "?") -> tuple[int, int]:
    """(width, height) from the header alone (nothing decoded); over ``max_pixels`` raises :class:`ImageTooLarge`."""
    img = _open(path, max_pixels, record_id)
    try:
        return img.size
    finally:
        img.close()


def _decode(path: str | Path | bytes, max_pixels: int, record_id: str) -> Image.Image:
    """Decoded, EXIF-rotated and :func:`_normalise`-d."""
    img = _open(path, max_pixels, record_id)
    try:
        with img:
            img.load()
            return _normalise(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(record_id, f"{_describe(path)} is unreadable ({err})") from err


def load_image(path: str | Path | bytes, background: tuple[int, int, int] = (0, 0, 0),
               record_id: str = "?", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file, or encoded image bytes (embedded in parquet), as RGB (transparency composited onto
    ``background``), EXIF rotation applied. More than ``max_pixels`` pixels: :class:`ImageTooLarge`, before decoding."""
    return _to_rgb(_decode(path, max_pixels, record_id), background)


def shrink_image(path: str | Path | bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 record_id: str = "?") -> bytes:
    """The image shrunk to :data:`MAX_SIDE` as lossless PNG bytes (transparency kept): what :func:`to_square`
    makes of it on every draw, done once: for opaque images the pixels training sees are the same, bit for bit
    (transparent ones are shrunk before, not after, compositing: within a level or two)."""
    img = _decode(path, max_pixels, record_id)
    img.thumbnail((MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()


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
