"""The bicubic, antialiased resize of uint8 images exactly as torchvision computes it on uint8
tensors (the resize of transformers' unified Gemma 4 image processor): separable passes,
width first, each with Keys' cubic (a = -0.5) widened by the downscale factor, weights rounded
to 16-bit fixed point and every pass rounded back to uint8.

Pillow's BICUBIC resize uses the same filter with 22-bit weights, so it differs by a unit or
two on a fraction of a percent of the values; this one gives torchvision's bytes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_bicubic_uint8"]

_CUBIC_A = -0.5
_SUPPORT = 2.0
# torchvision keeps every fixed-point weight (times two) below 2^15, with at most 22 bits.
_MAX_PRECISION = 22
# Source values converted to float64 at a time (32 MiB), however large the image.
_CHUNK_VALUES = 1 << 22


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _pass_matrix(n_in: int, n_out: int) -> tuple[np.ndarray, int]:
    """The [n_out, n_in] integer weights of one pass (as float64) and their fixed-point bits."""
    scale = n_in / n_out
    widen = max(scale, 1.0)
    support = _SUPPORT * widen
    centers = scale * (np.arange(n_out) + 0.5)
    # int() of the C code truncates toward zero; the bounds are never below -0.5 here.
    low = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    high = np.minimum(np.trunc(centers + support + 0.5), n_in).astype(np.int64)
    source = np.arange(n_in)
    taps = (source[None, :] >= low[:, None]) & (source[None, :] < high[:, None])
    weights = np.where(taps, _cubic((source[None, :] - centers[:, None] + 0.5) / widen), 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals != 0)
    largest = weights.max()
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + largest * (1 << (precision + 1))) < 1 << 15:
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5))
    return fixed, precision


def _resize_axis(image: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    weights, precision = _pass_matrix(image.shape[axis], n_out)
    moved = np.moveaxis(image, axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    out = np.empty((n_out, flat.shape[1]), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // flat.shape[0])
    for start in range(0, flat.shape[1], step):
        # Integer products and sums far below 2^53: float64 holds them exactly.
        sums = weights @ flat[:, start : start + step].astype(np.float64)
        sums += 1 << (precision - 1)
        out[:, start : start + step] = np.clip(np.floor(sums / (1 << precision)), 0, 255)
    return np.moveaxis(out.reshape((n_out,) + moved.shape[1:]), 0, axis)


def resize_bicubic_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`image` uint8 [H, W, C] resized to [height, width, C] as torchvision's
    `resize(..., BICUBIC, antialias=True)` does on a uint8 tensor."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 [H, W, C] image, not {image.dtype} {image.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}×{width}")
    out = image
    if width != out.shape[1]:
        out = _resize_axis(out, width, 1)
    if height != out.shape[0]:
        out = _resize_axis(out, height, 0)
    return np.ascontiguousarray(out)
