"""Safe image loading and the Qwen "smart resize" policy.

Images come from users' data files, from uploads and from tools, so loading is defensive:
every failure names the source and says what to do, and a pixel limit guards against
decompression bombs. Resizing happens here, once, so that the size the model sees is known
exactly (``ImageInfo``) and boxes can be mapped between original and model-input pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlreason.vision.boxes import Size

DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 Mpx: larger files are refused unless allowed
MAX_ASPECT_RATIO = 200  # Qwen vision towers refuse more extreme images

ImageSource = str | Path | bytes | Image.Image


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the source and the fix."""


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Load an image as RGB with its EXIF orientation applied.

    Args:
        source: a file path, raw bytes, a ``data:image/...;base64,`` URI or a PIL image.
        max_pixels: refuse images with more pixels than this (decompression-bomb guard).

    Raises:
        ImageLoadError: missing, empty, truncated, oversized or non-image input.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(_read_bytes(source, name), name)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(a guard against decompression bombs); downscale the image or raise max_image_pixels "
            "if you trust the file"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # Pillow's decoders raise many types on corrupt input
        raise ImageLoadError(f"{name}: the image is truncated or corrupt ({exc}); re-export or drop it") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB, compositing any transparency onto white (as Qwen's processors do).

    16-bit greyscale (modes ``I;16*`` and ``I``) is scaled to 8 bits; a plain conversion would
    clip almost every pixel to white.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        eight_bit = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(eight_bit, mode="L").convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image_size(path: str | Path) -> Size:
    """``(width, height)`` from the file header without decoding pixels (EXIF rotation applied)."""
    name = _describe(path)
    data = _read_bytes(path, name)
    with _open(data, name) as image:
        width, height = image.size
        try:  # Pillow decodes a whole PNG to look for EXIF after its pixels: only when there is some
            no_exif = image.format == "PNG" and "exif" not in image.info and b"eXIf" not in _png_chunk_types(data)
            orientation = 1 if no_exif else image.getexif().get(0x0112, 1)
        except Exception:  # a malformed EXIF block: the pixels may still be fine
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _png_chunk_types(data: bytes) -> set[bytes]:
    """The chunk types of a PNG file, read from the chunk headers (nothing is decompressed)."""
    types, position = set(), 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        types.add(data[position + 4:position + 8])
        position += 12 + length
    return types


def _describe(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    text = str(source)
    return text[:40] + "..." if text.startswith("data:") and len(text) > 40 else text


def _read_bytes(source: str | Path | bytes, name: str) -> bytes:
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str) and source.startswith("data:"):
        data = _decode_data_uri(source, name)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageLoadError(f"{name}: image file not found; check the path (relative paths in a JSONL "
                                 "file are resolved against the file's folder)")
        data = path.read_bytes()
    if not data:
        raise ImageLoadError(f"{name}: the image is empty (0 bytes); re-export or drop it")
    return data


def _decode_data_uri(uri: str, name: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageLoadError(f"{name}: a data URI must look like 'data:image/png;base64,<data>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(f"{name}: the data URI is not valid base64 ({exc})") from exc


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not an image format Pillow can read; convert it to PNG or JPEG") from exc
    except Exception as exc:  # Pillow's format plugins raise many types on malformed headers
        raise ImageLoadError(f"{name}: the image header is malformed ({exc}); re-export or drop it") from exc


@dataclass(frozen=True)
class ResizePolicy:
    """Qwen's smart-resize policy: sides are multiples of ``factor`` and the area lies in
    ``[min_pixels, max_pixels]``, keeping the aspect ratio as closely as possible.

    ``factor`` is the vision patch size times the spatial merge size (28 for Qwen2/2.5-VL,
    32 for Qwen3-VL); one model token covers a ``factor x factor`` square.
    """

    factor: int
    min_pixels: int
    max_pixels: int

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            raise ValueError(f"invalid resize policy {self}: need factor > 0 and 0 < min_pixels <= max_pixels")

    def target_size(self, size: Size) -> Size:
        """The model-input ``(width, height)`` for an image of ``size`` ``(width, height)``."""
        width, height = size
        if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            raise ImageLoadError(
                f"a {width}x{height} image has an aspect ratio above {MAX_ASPECT_RATIO}; crop it first"
            )
        f = self.factor
        h_bar, w_bar = round(height / f) * f, round(width / f) * f
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / f) * f
            w_bar = math.ceil(width * beta / f) * f
        return (w_bar, h_bar)


@dataclass(frozen=True)
class ImageInfo:
    """Sizes of one image: as stored (``original_size``) and as the model sees it (``input_size``)."""

    original_size: Size
    input_size: Size


def fit_image(image: Image.Image, policy: ResizePolicy) -> tuple[Image.Image, ImageInfo]:
    """Resize ``image`` to the policy's size (bicubic, as Qwen's processors) and record both sizes."""
    target = policy.target_size(image.size)
    resized = image if image.size == target else image.resize(target, Image.Resampling.BICUBIC)
    return resized, ImageInfo(original_size=image.size, input_size=target)
