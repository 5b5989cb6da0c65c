"""Image preprocessing: patch grids, soft-token counts and pixel values equal transformers' Gemma 4
image processor (PIL backend, run live) on the fixture's images and on generated sizes, aspect
ratios, modes and budgets; bad media of every kind is refused with a MediaError naming it."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pygemma4.errors import MediaError
from pygemma4.media.image import SOFT_TOKEN_BUDGETS, image_patches, load_image

transformers = pytest.importorskip("transformers")
from transformers.image_utils import load_image as hf_load_image  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import (  # noqa: E402
    Gemma4ImageProcessorPil,
)


def hf_patches(image, budget: int):
    processor = Gemma4ImageProcessorPil(max_soft_tokens=budget)
    out = processor(images=[image], return_tensors="np")
    positions = out["image_position_ids"][0]
    real = (positions != -1).all(axis=-1)
    return out["pixel_values"][0][real], positions[real], int(out["num_soft_tokens_per_image"][0])


def assert_same_as_hf(ours, image, budget: int) -> None:
    pixels, positions, n_soft = hf_patches(image, budget)
    assert ours.n_soft_tokens == n_soft
    assert ours.pixels.shape == pixels.shape
    np.testing.assert_array_equal(ours.positions, positions)
    rows, cols = ours.grid
    assert positions[:, 0].max() + 1 == cols and positions[:, 1].max() + 1 == rows
    assert np.abs(ours.pixels - pixels).max() <= 1e-6


def test_fixture_images_equal_the_stored_processor_outputs(fixtures_dir: Path):
    mm = fixtures_dir / "gemma4-tiny-mm"
    ref = np.load(mm / "ref_mm.npz")
    for key in ("img0", "img1"):
        ours = image_patches(mm / "inputs" / f"{key}.png", 70)
        n = len(ours.pixels)
        assert ours.n_soft_tokens == int(ref[f"{key}/num_soft_tokens"])
        assert np.abs(ours.pixels - ref[f"{key}/pixel_values"][:n]).max() <= 1e-6
        np.testing.assert_array_equal(ours.positions, ref[f"{key}/image_position_ids"][:n])
        assert (ref[f"{key}/image_position_ids"][n:] == -1).all()


SIZES = [(1, 1), (48, 48), (37, 1000), (1000, 37), (5, 3000), (640, 480), (479, 641), (768, 1024)]


@pytest.mark.parametrize("budget", SOFT_TOKEN_BUDGETS)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_generated_images_equal_transformers(height, width, budget):
    rng = np.random.default_rng(height * 7919 + width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    assert_same_as_hf(image_patches(image, budget), image, budget)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1", "CMYK"])
def test_modes_convert_as_transformers_does(mode):
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (90, 130, 4), dtype=np.uint8), "RGBA")
    image = rgba.convert(mode)
    assert_same_as_hf(image_patches(image, 140), image, 140)


def test_a_transparent_palette_png_is_composited_over_white(tmp_path):
    image = Image.new("P", (60, 50), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(1, (10, 10, 40, 30))
    path = tmp_path / "t.png"
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((15, 15)) == (255, 0, 0)
    assert_same_as_hf(image_patches(path, 70), Image.open(path), 70)


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (60, 200, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    ours = load_image(path)
    assert ours.size == (60, 200)
    assert_same_as_hf(image_patches(path, 280), hf_load_image(str(path)), 280)


@pytest.mark.parametrize("kind", ["path", "bytes", "data_uri", "array", "webp"])
def test_every_input_form_gives_the_same_patches(tmp_path, kind):
    rng = np.random.default_rng(9)
    array = rng.integers(0, 256, (70, 110, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    expected = image_patches(Image.fromarray(array), 70)
    if kind == "path":
        source: object = str(path)
    elif kind == "bytes":
        source = path.read_bytes()
    elif kind == "data_uri":
        source = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    elif kind == "array":
        source = array
    else:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "WEBP", lossless=True)
        source = buffer.getvalue()
    ours = image_patches(source, 70)
    np.testing.assert_array_equal(ours.pixels, expected.pixels)
    assert ours.digest == expected.digest


def test_the_digest_tells_images_apart():
    a = np.zeros((50, 50, 3), np.uint8)
    b = a.copy()
    b[10, 10, 1] = 1
    assert image_patches(a, 70).digest != image_patches(b, 70).digest
    assert image_patches(a, 70).digest != image_patches(a.reshape(25, 100, 3), 70).digest
    # The same pixels resized for another budget are another input of the tower.
    assert image_patches(a, 70).digest != image_patches(a, 140).digest


# -- bad media ---------------------------------------------------------------------------------


def _png(width: int, height: int, idat: bytes, bit_depth: int = 8, colour: int = 2) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _noise(height: int = 40, width: int = 60) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _bomb() -> bytes:
    """A 1-bit PNG of 30000×30000 zero pixels: 112 MB of pixels in about 110 kB."""
    row = b"\x00" * (1 + 30000 // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(30000)) + compressor.flush()
    return _png(30000, 30000, data, bit_depth=1, colour=0)


def _corrupt_png() -> bytes:
    data = bytearray(_encoded(_noise(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = bytes(50)
    return bytes(data)


def _animated(fmt: str) -> bytes:
    frames = [_noise(), _noise().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def _sixteen_bit_png() -> bytes:
    rows = b"".join(b"\x00" + b"\x12\x34" * 20 for _ in range(20))
    return _png(20, 20, zlib.compress(rows), bit_depth=16, colour=0)


BAD_MEDIA = {
    "empty bytes": (b"", "empty"),
    "text bytes": (b"hello, this is not an image at all", "not a PNG, JPEG or WEBP image"),
    "html bytes": (b"<!doctype html><html></html>", "not a PNG"),
    "truncated PNG": (lambda: _encoded(_noise(), "PNG")[:300], "corrupt or truncated"),
    "truncated JPEG": (lambda: _encoded(_noise(), "JPEG")[:200], "corrupt or truncated"),
    "truncated WebP": (lambda: _encoded(_noise(), "WEBP")[:60], "image"),
    "corrupt PNG data": (_corrupt_png, "corrupt or truncated"),
    "PNG header only": (lambda: _encoded(_noise(), "PNG")[:33], "corrupt or truncated"),
    "PNG claiming 100000x100000": (
        lambda: _png(100_000, 100_000, zlib.compress(b"\x00" * 100)),
        "decompression bomb",
    ),
    "decompression bomb": (_bomb, "decompression bomb"),
    "PNG of 80 megapixels": (
        lambda: _png(10_000, 8_000, zlib.compress(b"\x00" * 100)),
        "10000×8000 pixels, more than",
    ),
    "zero-width PNG": (lambda: _png(0, 10, zlib.compress(b"")), "image"),
    "GIF": (lambda: _encoded(_noise(), "GIF"), "not a PNG, JPEG or WEBP image"),
    "BMP": (lambda: _encoded(_noise(), "BMP"), "not a PNG, JPEG or WEBP image"),
    "TIFF": (lambda: _encoded(_noise(), "TIFF"), "not a PNG, JPEG or WEBP image"),
    "animated PNG": (lambda: _animated("PNG"), "animated PNG of 2 frames"),
    "animated WebP": (lambda: _animated("WEBP"), "animated WEBP of 2 frames"),
    "16-bit grey PNG": (_sixteen_bit_png, "pixel mode"),
    "float PIL image": (lambda: Image.new("F", (10, 10)), "pixel mode 'F'"),
    "32-bit integer PIL image": (lambda: Image.new("I", (10, 10)), "pixel mode 'I'"),
    "HSV PIL image": (lambda: Image.new("HSV", (10, 10)), "pixel mode 'HSV'"),
    "float array": (lambda: np.zeros((10, 10, 3), np.float32), "must be uint8"),
    "two-channel array": (lambda: np.zeros((10, 10, 2), np.uint8), "[H, W, 3]"),
    "4-D array": (lambda: np.zeros((1, 10, 10, 3), np.uint8), "[H, W, 3]"),
    "empty array": (lambda: np.zeros((0, 10, 3), np.uint8), "no pixels"),
    "http URL": ("https://example.com/cat.png", "not fetched"),
    "data URI of text": ("data:text/plain;base64,aGVsbG8=", "not an image"),
    "data URI without base64": ("data:image/png,abc", "data URI must be"),
    "malformed base64": ("data:image/png;base64,@@@@", "malformed"),
    "integer": (42, "not int"),
    "None": (None, "not NoneType"),
}


@pytest.mark.parametrize("kind", list(BAD_MEDIA))
def test_bad_media_is_refused_cleanly(kind):
    source, words = BAD_MEDIA[kind]
    if callable(source):
        source = source()
    with pytest.raises(MediaError) as e:
        image_patches(source, 70)
    assert words in str(e.value)


def test_bad_files_are_refused_naming_the_path(tmp_path):
    with pytest.raises(MediaError, match="no such file") as e:
        load_image(tmp_path / "absent.png")
    assert "absent.png" in str(e.value)
    with pytest.raises(MediaError, match="is a directory"):
        load_image(tmp_path)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_encoded(_noise(), "PNG")[:300])
    with pytest.raises(MediaError, match="corrupt or truncated") as e:
        load_image(truncated)
    assert str(truncated) in str(e.value)


@pytest.mark.parametrize("budget", [0, 69, 100, 2240, "280"])
def test_budgets_outside_the_processors_are_refused(budget):
    with pytest.raises(MediaError, match="max_image_tokens must be one of 70, 140"):
        image_patches(np.zeros((10, 10, 3), np.uint8), budget)
