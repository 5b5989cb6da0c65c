"""The audio encoder's operations on the CPU backend against plain numpy references (float64
loops written from each op's definition in csrc/ops/ops.h)."""

from __future__ import annotations

import numpy as np
import pytest

from pygemma4 import _core

ATOL = 2e-5


@pytest.fixture(scope="module")
def ops():
    return _core.OpsCheck("cpu", threads=2)


def rng_for(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


def close(actual: np.ndarray, expected: np.ndarray, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize(("rows", "dim"), [(1, 8), (7, 128), (33, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm(ops, rows, dim, with_bias):
    rng = rng_for(rows, dim)
    x = (3 * rng.standard_normal((rows, dim)) + 1).astype(np.float32)
    weight = rng.standard_normal(dim).astype(np.float32)
    bias = rng.standard_normal(dim).astype(np.float32) if with_bias else None
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    expected = expected * weight + (bias if with_bias else 0.0)
    close(ops.layer_norm(x, weight, bias, 1e-6), expected.astype(np.float32), atol=1e-4)


@pytest.mark.parametrize(
    ("height", "width", "in_ch", "out_ch"),
    [(1, 1, 1, 4), (7, 10, 1, 16), (8, 9, 6, 5), (13, 32, 16, 8)],
)
def test_conv2d_3x3_s2(ops, height, width, in_ch, out_ch):
    rng = rng_for(height, width, in_ch, out_ch)
    x = rng.standard_normal((height, width, in_ch)).astype(np.float32)
    weight = rng.standard_normal((out_ch, in_ch, 3, 3)).astype(np.float32)
    padded = np.zeros((height + 2, width + 2, in_ch))
    padded[1:-1, 1:-1] = x
    out_h, out_w = (height + 1) // 2, (width + 1) // 2
    expected = np.zeros((out_h, out_w, out_ch))
    for oy in range(out_h):
        for ox in range(out_w):
            for o in range(out_ch):
                window = padded[2 * oy : 2 * oy + 3, 2 * ox : 2 * ox + 3]  # [3, 3, in]
                expected[oy, ox, o] = np.sum(window * weight[o].transpose(1, 2, 0))
    close(ops.conv2d_3x3_s2(x, weight), expected.astype(np.float32), atol=1e-4)


@pytest.mark.parametrize(
    ("n", "channels", "kernel"), [(1, 4, 5), (9, 64, 5), (3, 7, 1), (20, 3, 8)]
)
def test_depthwise_conv_causal(ops, n, channels, kernel):
    rng = rng_for(n, channels, kernel)
    x = rng.standard_normal((n, channels)).astype(np.float32)
    weight = rng.standard_normal((channels, kernel)).astype(np.float32)
    expected = np.zeros((n, channels))
    for t in range(n):
        for i in range(kernel):
            src = t - kernel + 1 + i
            if src >= 0:
                expected[t] += x[src] * weight[:, i]
    close(ops.depthwise_conv_causal(x, weight), expected.astype(np.float32))


def test_glu(ops):
    x = rng_for(1).standard_normal((6, 2 * 40)).astype(np.float32) * 4
    x64 = x.astype(np.float64)
    expected = x64[:, :40] / (1 + np.exp(-x64[:, 40:]))
    close(ops.glu(x), expected.astype(np.float32))


def test_silu_relu_clamp(ops):
    x = np.concatenate([rng_for(2).standard_normal(300) * 6, [0.0, -0.0, 80.0, -80.0]])
    x = x.astype(np.float32)
    x64 = x.astype(np.float64)
    close(ops.elementwise("silu", x), (x64 / (1 + np.exp(-x64))).astype(np.float32))
    np.testing.assert_array_equal(ops.elementwise("relu", x), np.maximum(x, 0))
    np.testing.assert_array_equal(ops.clamp(x, -1.5, 2.0), np.clip(x, -1.5, 2.0))
    np.testing.assert_array_equal(ops.clamp(x, -np.inf, np.inf), x)


def test_column_scale_and_bias(ops):
    rng = rng_for(3)
    x = rng.standard_normal((5, 12)).astype(np.float32)
    s = rng.standard_normal(12).astype(np.float32)
    np.testing.assert_array_equal(ops.cols("mul", x, s), x * s)
    np.testing.assert_array_equal(ops.cols("add", x, s), x + s)
    with pytest.raises(ValueError, match="unknown column op"):
        ops.cols("sub", x, s)


@pytest.mark.parametrize(
    ("n", "n_head", "head_dim", "max_past", "cap"),
    [(1, 1, 4, 0, 50.0), (5, 2, 8, 11, 50.0), (40, 2, 32, 11, 50.0), (17, 3, 4, 3, 2.0)],
)
def test_local_attention(ops, n, n_head, head_dim, max_past, cap):
    rng = rng_for(n, n_head, head_dim, max_past)
    width = n_head * head_dim
    q, k, v = (2 * rng.standard_normal((3, n, width))).astype(np.float32)
    rel = rng.standard_normal((max_past + 1, width)).astype(np.float32)
    expected = np.zeros((n, width))
    for t in range(n):
        keys = range(max(0, t - max_past), t + 1)
        for h in range(n_head):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            logits = np.array(
                [q[t, cols].astype(np.float64) @ (k[j, cols] + rel[t - j, cols]) for j in keys]
            )
            logits = cap * np.tanh(logits / cap)
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            expected[t, cols] = weights @ v[list(keys), cols]
    close(ops.local_attention(q, k, v, rel, n_head, max_past, cap), expected.astype(np.float32))


def test_misshapen_inputs_are_refused(ops):
    x = np.zeros((4, 4, 2), np.float32)
    with pytest.raises(ValueError, match="weight"):
        ops.conv2d_3x3_s2(x, np.zeros((3, 5, 3, 3), np.float32))
    with pytest.raises(ValueError, match="rel"):
        z = np.zeros((3, 8), np.float32)
        ops.local_attention(z, z, z, np.zeros((2, 8), np.float32), 2, 3, 50.0)
