"""The vision tower's operations on the CPU backend against plain numpy references: clamp,
dense (bidirectional) attention with grouped heads, k×k average pooling and 2-D RoPE."""

from __future__ import annotations

import numpy as np
import pytest

from pygemma4 import _core


@pytest.fixture(scope="module")
def ops():
    return _core.OpsCheck("cpu", threads=2)


def test_clamp_equals_numpy(ops):
    x = np.random.default_rng(0).normal(0, 3, 50_001).astype(np.float32)
    np.testing.assert_array_equal(ops.clamp(x, -1.5, 2.25), np.clip(x, -1.5, 2.25))


def attention_reference(q, k, v, n_head, n_head_kv, head_dim, scale):
    n = q.shape[0]
    qh = q.reshape(n, n_head, head_dim).astype(np.float64)
    kh = np.repeat(k.reshape(n, n_head_kv, head_dim), n_head // n_head_kv, axis=1)
    vh = np.repeat(v.reshape(n, n_head_kv, head_dim), n_head // n_head_kv, axis=1)
    scores = np.einsum("thd,shd->hts", qh, kh) * scale
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", weights, vh).reshape(n, n_head * head_dim)


@pytest.mark.parametrize("isa", _core.cpu_isas())
@pytest.mark.parametrize(
    ("n", "n_head", "n_head_kv", "head_dim", "scale"),
    [
        (1, 1, 1, 8, 1.0),
        (63, 2, 2, 32, 1.0),
        (200, 4, 2, 16, 0.25),
        (9, 12, 12, 64, 1.0),
        # Keys and queries not whole panels (32 keys, 8 queries), a head wider than one panel
        # of rows and not a multiple of it, three query heads per key head.
        (77, 6, 2, 40, 0.125),
        (300, 3, 1, 64, 0.125),
    ],
)
def test_dense_attention_equals_numpy(monkeypatch, isa, n, n_head, n_head_kv, head_dim, scale):
    """On every CPU kernel set the build has, the tiled products included."""
    monkeypatch.setenv("PYGEMMA4_CPU_KERNELS", isa)
    ops = _core.OpsCheck("cpu", threads=2)
    rng = np.random.default_rng(n)
    q = rng.normal(0, 1, (n, n_head * head_dim)).astype(np.float32)
    k = rng.normal(0, 1, (n, n_head_kv * head_dim)).astype(np.float32)
    v = rng.normal(0, 1, (n, n_head_kv * head_dim)).astype(np.float32)
    out = ops.attention_dense(q, k, v, n_head, n_head_kv, head_dim, scale)
    expected = attention_reference(q, k, v, n_head, n_head_kv, head_dim, scale)
    assert np.abs(out - expected).max() < 2e-5


def test_dense_attention_is_not_causal(ops):
    """The first token sees the last: changing the last value changes the first output."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(0, 1, (5, 8)).astype(np.float32) for _ in range(3))
    before = ops.attention_dense(q, k, v, 1, 1, 8, 1.0)
    v[-1] += 10
    after = ops.attention_dense(q, k, v, 1, 1, 8, 1.0)
    assert np.abs(after[0] - before[0]).min() > 1e-3


@pytest.mark.parametrize(("rows", "cols", "k"), [(3, 3, 3), (21, 27, 3), (8, 4, 2), (5, 7, 1)])
def test_average_pooling_equals_numpy(ops, rows, cols, k):
    x = np.random.default_rng(rows * cols).normal(0, 1, (rows, cols, 16)).astype(np.float32)
    expected = x.reshape(rows // k, k, cols // k, k, 16).mean(axis=(1, 3))
    assert np.abs(ops.avg_pool_2d(x, k) - expected).max() < 1e-6


def rope_2d_reference(x, pos_x, pos_y, n_head, head_dim, base):
    """transformers' axial rule: each half of a head rotated (rotate-half) by one coordinate."""
    n = x.shape[0]
    heads = x.reshape(n, n_head, head_dim).astype(np.float64)
    half, quarter = head_dim // 2, head_dim // 4
    inv_freq = 1.0 / base ** (np.arange(0, half, 2) / half)
    out = np.empty_like(heads)
    for part, pos in enumerate((pos_x, pos_y)):
        angles = pos[:, None].astype(np.float64) * inv_freq  # [n, quarter]
        cos = np.cos(angles)[:, None, :]
        sin = np.sin(angles)[:, None, :]
        a = heads[..., part * half : part * half + quarter]
        b = heads[..., part * half + quarter : (part + 1) * half]
        out[..., part * half : part * half + quarter] = a * cos - b * sin
        out[..., part * half + quarter : (part + 1) * half] = b * cos + a * sin
    return out.reshape(n, n_head * head_dim)


@pytest.mark.parametrize(("n_head", "head_dim", "base"), [(2, 32, 100.0), (12, 64, 100.0)])
def test_rope_2d_equals_the_axial_rule(ops, n_head, head_dim, base):
    rng = np.random.default_rng(head_dim)
    n = 40
    x = rng.normal(0, 1, (n, n_head * head_dim)).astype(np.float32)
    pos_x = rng.integers(0, 64, n).astype(np.int32)
    pos_y = rng.integers(0, 64, n).astype(np.int32)
    out = ops.rope_2d(x, pos_x, pos_y, n_head, head_dim, base)
    expected = rope_2d_reference(x, pos_x, pos_y, n_head, head_dim, base)
    assert np.abs(out - expected).max() < 1e-5
