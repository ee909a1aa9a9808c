"""Image loading (sources, modes, EXIF, errors) and the smart-resize policy."""

from __future__ import annotations

import base64
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlreason.vision.images import ImageInfo, ImageLoadError, ResizePolicy, fit_image, load_image, read_image_size

QWEN2_MIN, QWEN2_MAX = 56 * 56, 28 * 28 * 1280  # transformers' Qwen2-VL defaults
QWEN3_MIN, QWEN3_MAX = 64 * 64, 32 * 32 * 1024


def gradient_image(width: int = 60, height: int = 40) -> Image.Image:
    """An RGB image whose pixels are all different enough to survive JPEG."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, axis=1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_load_error(source, *fragments: str, **kwargs) -> str:
    """``load_image(source)`` raises ImageLoadError whose message contains every fragment."""
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------- sources


def test_load_image_from_path_str_and_path(tmp_path):
    image = gradient_image()
    path = write(tmp_path / "a.png", encode(image))
    for source in (path, str(path)):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (60, 40)
        assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_load_image_from_bytes():
    image = gradient_image(7, 5)
    loaded = load_image(encode(image))
    assert loaded.mode == "RGB" and loaded.size == (7, 5)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_load_image_from_data_uri():
    image = gradient_image(9, 4)
    uri = "data:image/png;base64," + base64.b64encode(encode(image)).decode()
    loaded = load_image(uri)
    assert loaded.size == (9, 4)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))
    assert read_image_size(uri) == (9, 4)


def test_load_image_from_pil_image():
    image = gradient_image(5, 6)
    loaded = load_image(image)
    assert loaded.mode == "RGB" and loaded.size == (5, 6)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


# ----------------------------------------------------------------------------- modes


def test_rgba_transparency_composites_onto_white(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (200, 10, 20, 255))  # opaque red
    rgba.putpixel((2, 1), (0, 0, 0, 128))  # half-transparent black over white -> about 127
    loaded = load_image(write(tmp_path / "t.png", encode(rgba)))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (200, 10, 20)
    assert all(abs(c - 127) <= 1 for c in loaded.getpixel((2, 1)))


def test_palette_with_transparency_becomes_rgb_on_white():
    palette = Image.new("P", (3, 2), 0)
    palette.putpalette([10, 20, 30, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 is transparent
    loaded = load_image(encode(palette))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (0, 0, 255)


def test_palette_without_transparency_keeps_colours():
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 12, 200, 34] + [0] * 762)
    loaded = load_image(encode(palette))
    assert loaded.mode == "RGB" and loaded.getpixel((1, 1)) == (12, 200, 34)


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 100, 100), ("LA", (100, 255), 100), ("1", 1, 255)])
def test_greyscale_becomes_rgb(mode, value, expected):
    loaded = load_image(encode(Image.new(mode, (3, 3), value)))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((2, 2)) == (expected, expected, expected)


def test_16_bit_greyscale_keeps_its_brightness():
    """A 16-bit greyscale PNG at half intensity (32768 / 65535) must load as mid grey (~128), not white."""
    grey16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    data = encode(grey16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # the file really holds 16-bit samples
    pixel = load_image(data).getpixel((0, 0))
    assert all(127 <= c <= 129 for c in pixel), pixel


# ----------------------------------------------------------------------------- EXIF


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif, quality=95)


def test_exif_orientation_6_rotates(tmp_path):
    stored = Image.new("RGB", (60, 40), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red block at the stored top-left corner
    path = write(tmp_path / "rot.jpg", jpeg_with_orientation(stored, 6))
    assert Image.open(path).size == (60, 40)  # as stored
    loaded = load_image(path)
    # Orientation 6: rotate 90 degrees clockwise to display; the stored top-left goes to the top-right.
    assert loaded.size == (40, 60)
    assert read_image_size(path) == (40, 60)
    red, green, blue = loaded.getpixel((35, 4))
    assert red > 200 and green < 60 and blue < 60
    assert min(loaded.getpixel((4, 4))) > 200  # the top-left of the displayed image is white


def test_png_exif_before_or_after_the_pixels_is_read(tmp_path):
    """The size of a PNG is read from its header; its EXIF, before the pixels or after them (an
    eXIf chunk just before IEND), still turns it, as loading does."""
    import zlib

    exif = Image.Exif()
    exif[0x0112] = 6
    before = write(tmp_path / "before.png", encode(gradient_image(60, 40), "PNG", exif=exif))
    plain = encode(gradient_image(60, 40), "PNG")
    payload = exif.tobytes()
    chunk = len(payload).to_bytes(4, "big") + b"eXIf" + payload + zlib.crc32(b"eXIf" + payload).to_bytes(4, "big")
    after = write(tmp_path / "after.png", plain[:-12] + chunk + plain[-12:])
    for path in (before, after):
        assert read_image_size(path) == load_image(path).size == (40, 60)


def test_read_image_size_without_exif(tmp_path):
    assert read_image_size(write(tmp_path / "a.png", encode(gradient_image(33, 21)))) == (33, 21)
    assert read_image_size(write(tmp_path / "a.jpg", jpeg_with_orientation(gradient_image(33, 21), 1))) == (33, 21)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    assert_load_error(path, str(path), "not found", "check the path")
    with pytest.raises(ImageLoadError, match="not found"):
        read_image_size(path)


def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.png", b"")
    assert_load_error(path, str(path), "empty", "re-export or drop it")
    assert_load_error(b"", "empty")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise, "RGB"), fmt)  # noise: pixel data dominate the file, not headers
    path = write(tmp_path / f"half.{fmt.lower()}", data[: len(data) // 2])
    assert read_image_size(path) == (60, 40)  # the header is intact
    assert_load_error(path, str(path), "truncated", "re-export or drop it")


def test_text_file_with_png_extension(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    assert_load_error(path, str(path), "not an image format", "convert it to PNG or JPEG")
    with pytest.raises(ImageLoadError, match="not an image format"):
        read_image_size(path)


def test_too_many_pixels(tmp_path):
    path = write(tmp_path / "big.png", encode(Image.new("RGB", (100, 50))))
    message = assert_load_error(path, str(path), "100x50", "5000", "4999", "downscale", max_pixels=4999)
    assert "max_image_pixels" in message
    assert load_image(path, max_pixels=5000).size == (100, 50)  # exactly at the limit is allowed
    assert_load_error(Image.new("RGB", (100, 50)), "<PIL image>", "exceeds the limit", max_pixels=100)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("data:image/png;base64,!!!not-base64!!!", "not valid base64"),
        ("data:image/png,iVBORw0KGgo=", "must look like 'data:image/png;base64,<data>'"),
        ("data:text/plain;base64,aGVsbG8=", "must look like"),
        ("data:image/png;base64", "must look like"),
        ("data:image/png;base64,aGVsbG8=", "not an image format"),  # valid base64 of "hello"
        ("data:image/png;base64,", "empty"),
    ],
)
def test_malformed_data_uri(uri, fragment):
    assert_load_error(uri, "data:", fragment)


# ----------------------------------------------------------------------------- resize policy


def reference_size(width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' smart_resize, which takes and returns (height, width), as (width, height)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


POLICIES = [
    ResizePolicy(factor=28, min_pixels=QWEN2_MIN, max_pixels=QWEN2_MAX),
    ResizePolicy(factor=32, min_pixels=QWEN3_MIN, max_pixels=QWEN3_MAX),
    ResizePolicy(factor=28, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28),  # a tight CPU budget
]
SIDES = [1, 2, 13, 14, 27, 28, 29, 41, 42, 56, 99, 100, 224, 333, 500, 1000, 1023, 2048, 4000, 9999]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"f{p.factor}-{p.min_pixels}-{p.max_pixels}")
def test_target_size_matches_transformers_on_a_grid(policy):
    checked = 0
    for width, height in itertools.product(SIDES, SIDES):
        if max(width, height) / min(width, height) > 200:
            continue
        expected = reference_size(width, height, policy.factor, policy.min_pixels, policy.max_pixels)
        assert policy.target_size((width, height)) == expected, (width, height)
        checked += 1
    assert checked > 300


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20_000),
    height=st.integers(1, 20_000),
    policy=st.sampled_from(POLICIES),
)
def test_target_size_matches_transformers_property(width, height, policy):
    if max(width, height) / min(width, height) > 200:
        with pytest.raises(ValueError):
            reference_size(width, height, policy.factor, policy.min_pixels, policy.max_pixels)
        with pytest.raises(ImageLoadError, match="aspect ratio above 200"):
            policy.target_size((width, height))
        return
    target = policy.target_size((width, height))
    assert target == reference_size(width, height, policy.factor, policy.min_pixels, policy.max_pixels)
    assert target[0] % policy.factor == 0 and target[1] % policy.factor == 0 and min(target) > 0


@pytest.mark.parametrize("size", [(200, 1), (1, 200), (4000, 20), (20, 4000)])
def test_extreme_aspect_ratio_at_the_limit_matches_transformers(size):
    policy = POLICIES[0]
    assert policy.target_size(size) == reference_size(*size, policy.factor, policy.min_pixels, policy.max_pixels)


@pytest.mark.parametrize("size", [(201, 1), (1, 201), (4021, 20), (10, 5000)])
def test_aspect_ratio_above_200_is_refused(size):
    with pytest.raises(ImageLoadError, match="aspect ratio above 200; crop it first") as info:
        POLICIES[0].target_size(size)
    assert f"{size[0]}x{size[1]}" in str(info.value)


def test_target_size_hand_computed():
    policy = POLICIES[0]
    # 100x50: round(100/28)=4 -> 112, round(50/28)=2 -> 56; 112*56 = 6272 lies within the bounds.
    assert policy.target_size((100, 50)) == (112, 56)
    # 10x10 rounds to 0x0 < min 3136: beta = sqrt(3136/100) = 5.6, ceil(56/28)*28 = 56.
    assert policy.target_size((10, 10)) == (56, 56)
    tight = POLICIES[2]
    # 1000x1000 rounds to 1008x1008 > 12544: beta = sqrt(1e6/12544) ~ 8.93, floor(112/28)*28 = 112.
    assert tight.target_size((1000, 1000)) == (112, 112)


@pytest.mark.parametrize(
    "kwargs", [dict(factor=0, min_pixels=1, max_pixels=2), dict(factor=28, min_pixels=0, max_pixels=2),
               dict(factor=28, min_pixels=10, max_pixels=9)]
)
def test_invalid_policy(kwargs):
    with pytest.raises(ValueError, match="invalid resize policy"):
        ResizePolicy(**kwargs)


def test_fit_image_resizes_and_records_sizes():
    image = gradient_image(100, 50)
    resized, info = fit_image(image, POLICIES[0])
    assert resized.size == (112, 56)
    assert info == ImageInfo(original_size=(100, 50), input_size=(112, 56))
    assert image.size == (100, 50)  # the original is untouched


def test_fit_image_keeps_an_image_that_already_fits():
    image = gradient_image(112, 56)
    resized, info = fit_image(image, POLICIES[0])
    assert resized.size == (112, 56)
    assert np.array_equal(np.asarray(resized), np.asarray(image))
    assert info.original_size == info.input_size == (112, 56)
