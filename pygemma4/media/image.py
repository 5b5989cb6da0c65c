"""Images for Gemma 4's vision tower: decoding (PNG, JPEG, WebP; EXIF orientation; RGB with
transparency over white), the aspect-preserving resize to the soft-token budget and the 16×16
patches, exactly as transformers' Gemma 4 image processor (its PIL backend) makes them.

Nothing about the input is trusted: the size a file claims is checked before its pixels are
decoded, and every decoding failure ends in a MediaError naming the input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import MediaError
from .resize import resize_bicubic_uint8

__all__ = [
    "IMAGE_FORMATS",
    "MAX_IMAGE_PIXELS",
    "SOFT_TOKEN_BUDGETS",
    "ImageInput",
    "ImagePatches",
    "image_blocks",
    "image_patches",
    "load_image",
    "target_size",
]

# What the model's processor allows per image.
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# The largest image decoded: 64 megapixels (8K × 8K), 192 MiB as RGB. Every budget resizes far
# below it; larger claims are refused before any pixel is decoded.
MAX_IMAGE_PIXELS = 1 << 26
# The largest encoded file read (a 64-megapixel PNG of noise is about this size).
MAX_IMAGE_BYTES = 256 << 20
# Modes Pillow converts to RGB faithfully; others (16-bit, float, HSV, ...) are refused.
_CONVERTIBLE_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr"}
)

ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray


@dataclass(frozen=True)
class ImagePatches:
    """One image as the vision tower takes it: `pixels` float32 [rows·cols, patch²·3] in [0, 1]
    (each patch flattened in (row, column, channel) order), `positions` int32 [rows·cols, 2] the
    (column, row) of each patch, `grid` = (rows, cols) of patches, `n_soft_tokens` the rows
    of embeddings it becomes, `digest` a SHA-256 of the decoded RGB pixels and the size they are
    resized to."""

    pixels: np.ndarray
    positions: np.ndarray
    grid: tuple[int, int]
    n_soft_tokens: int
    digest: str


def load_image(source: ImageInput, name: str | None = None) -> Image.Image:
    """The RGB image of `source`: a path, encoded bytes, a `data:image/...;base64,` URI, a PIL
    image or a uint8 array [H, W], [H, W, 3] or [H, W, 4]. EXIF orientation is applied to
    decoded files; transparency is composited over white. MediaError names the input."""
    label = name or _label(source)
    if isinstance(source, Image.Image):
        image = _checked_pil(source, label)
    elif isinstance(source, np.ndarray):
        image = _from_array(source, label)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source), label)
    elif isinstance(source, str) and source.startswith("data:"):
        image = _decode(_data_uri_bytes(source, label), label)
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise MediaError(
            f"{label}: images are not fetched from the network; give a file, bytes or a data URI"
        )
    elif isinstance(source, (str, os.PathLike)):
        image = _decode(_read_file(Path(source), label), label)
    else:
        raise MediaError(
            f"an image must be a path, bytes, a data URI, a PIL image or a uint8 array, "
            f"not {type(source).__name__}"
        )
    return _to_rgb(image, label)


def target_size(height: int, width: int, max_soft_tokens: int, patch: int, pooling: int):
    """(height, width) the processor resizes an image to: the largest multiple of
    patch·pooling per side, keeping the aspect ratio, with at most max_soft_tokens·pooling²
    patches."""
    max_patches = max_soft_tokens * pooling * pooling
    budget = max_patches * patch * patch
    factor = math.sqrt(budget / (height * width))
    side = pooling * patch
    h = int(math.floor(factor * height / side)) * side
    w = int(math.floor(factor * width / side)) * side
    longest = (max_patches // (pooling * pooling)) * side
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    return h, w


def image_patches(
    source: ImageInput,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    patch: int = 16,
    pooling: int = 3,
    name: str | None = None,
) -> ImagePatches:
    """`source` decoded (see load_image), resized to the soft-token budget (bicubic) and cut
    into patches, as transformers' Gemma 4 image processor does."""
    _check_budget(max_soft_tokens)
    image = load_image(source, name)
    h, w = target_size(image.height, image.width, max_soft_tokens, patch, pooling)
    digest = _digest(image, h, w)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    rows, cols = h // patch, w // patch
    patches = (
        pixels.reshape(rows, patch, cols, patch, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * cols, patch * patch * 3)
    )
    return ImagePatches(
        np.ascontiguousarray(patches),
        grid_positions(rows, cols),
        (rows, cols),
        rows * cols // (pooling * pooling),
        digest,
    )


def image_blocks(
    source: ImageInput,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    block: int = 48,
    name: str | None = None,
) -> ImagePatches:
    """`source` decoded (see load_image), resized to the soft-token budget and cut into
    block×block blocks, one per soft token, as transformers' unified (12B-style) Gemma 4
    image processor makes them: sides the largest multiples of `block` within
    max_soft_tokens·block² pixels, torchvision's bicubic antialiased uint8 resize. Each block's
    values are in (channel, row, column) order, the order of the projector file's weights."""
    _check_budget(max_soft_tokens)
    image = load_image(source, name)
    h, w = target_size(image.height, image.width, max_soft_tokens, block, 1)
    digest = _digest(image, h, w)
    pixels = np.asarray(image, dtype=np.uint8)
    if (h, w) != (image.height, image.width):
        pixels = resize_bicubic_uint8(pixels, h, w)
    # The processor's float32 rescale, to the bit.
    values = pixels.astype(np.float32) * np.float32(1 / 255)
    rows, cols = h // block, w // block
    blocks = (
        values.reshape(rows, block, cols, block, 3)
        .transpose(0, 2, 4, 1, 3)
        .reshape(rows * cols, 3 * block * block)
    )
    return ImagePatches(
        np.ascontiguousarray(blocks), grid_positions(rows, cols), (rows, cols), rows * cols, digest
    )


def grid_positions(rows: int, cols: int) -> np.ndarray:
    """The (column, row) int32 [rows·cols, 2] of a grid's cells in raster order."""
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    return np.stack([xs, ys], axis=-1).reshape(rows * cols, 2).astype(np.int32)


def _check_budget(max_soft_tokens: int) -> None:
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise MediaError(
            f"max_image_tokens must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, "
            f"not {max_soft_tokens!r}"
        )


def _digest(image: Image.Image, h: int, w: int) -> str:
    # The size resized to is part of the name: the same image at two budgets is two inputs.
    size = f"{image.width}x{image.height}>{w}x{h}:"
    return hashlib.sha256(size.encode() + image.tobytes()).hexdigest()


def _label(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        return f"image {text[:40]}..." if text.startswith("data:") else f"image {text}"
    return f"image ({type(source).__name__})"


def _read_file(path: Path, label: str) -> bytes:
    try:
        if path.is_dir():
            raise MediaError(f"{label}: is a directory, not an image file")
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise MediaError(f"{label}: {size} bytes, more than the {MAX_IMAGE_BYTES} read")
        return path.read_bytes()
    except FileNotFoundError:
        raise MediaError(f"{label}: no such file") from None
    except OSError as e:
        raise MediaError(f"{label}: cannot read the file: {e.strerror or e}") from None


def _data_uri_bytes(uri: str, label: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise MediaError(f"{label}: a data URI must be 'data:image/<type>;base64,<data>'")
    mime = header[len("data:") : -len(";base64")]
    if not mime.startswith("image/"):
        raise MediaError(f"{label}: data URI of type '{mime}', not an image")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise MediaError(f"{label}: data URI longer than the {MAX_IMAGE_BYTES} bytes read")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{label}: the data URI's base64 payload is malformed") from None


def _decode(data: bytes, label: str) -> Image.Image:
    if not data:
        raise MediaError(f"{label}: empty, no image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            _check_size(image.width, image.height, label)
            if getattr(image, "n_frames", 1) > 1:
                raise MediaError(
                    f"{label}: an animated {image.format} of {image.n_frames} frames; give one "
                    "still image"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
    except MediaError:
        raise
    except Image.UnidentifiedImageError:
        claimed = _claimed_format(data)
        if claimed:
            raise MediaError(f"{label}: corrupt or truncated {claimed} data") from None
        raise MediaError(
            f"{label}: not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"{label}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError) as e:
        raise MediaError(f"{label}: corrupt or truncated image data ({e})") from None
    return _checked_pil(image, label)


def _claimed_format(data: bytes) -> str | None:
    """The format whose signature `data` starts with, among those decoded."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_size(width: int, height: int, label: str) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"{label}: has no pixels ({width}×{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"{label}: {width}×{height} pixels, more than the {MAX_IMAGE_PIXELS} decoded "
            "(a decompression bomb or an image far larger than the model can use)"
        )


def _checked_pil(image: Image.Image, label: str) -> Image.Image:
    _check_size(image.width, image.height, label)
    if image.mode not in _CONVERTIBLE_MODES:
        raise MediaError(
            f"{label}: pixel mode '{image.mode}' is not supported (8-bit grey, palette, RGB, "
            "RGBA or CMYK images are)"
        )
    return image


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise MediaError(f"{label}: an image array must be uint8, not {array.dtype}")
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
    else:
        raise MediaError(
            f"{label}: an image array must be [H, W], [H, W, 3] or [H, W, 4], not "
            f"{list(array.shape)}"
        )
    _check_size(array.shape[1], array.shape[0], label)
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """RGB with any transparency composited over white, as the processor converts."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError) as e:
        raise MediaError(f"{label}: cannot convert the image to RGB ({e})") from None
