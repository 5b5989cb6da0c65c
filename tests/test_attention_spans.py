"""The model's attention on the CPU backend against a plain numpy reference: causal, sliding
windows, and spans of image tokens that attend to each other in both directions (the unified
Gemma 4 models' rule: a row in a span sees every position of it, however far, on full and
sliding layers alike; other rows stay causal)."""

from __future__ import annotations

import numpy as np
import pytest

from pygemma4 import _core


@pytest.fixture(scope="module")
def ops():
    return _core.OpsCheck("cpu", threads=2)


def allowed(n: int, window: int, spans: list[tuple[int, int]]) -> np.ndarray:
    """[n, n] bool: query row q may read key column k (spans as (first, stop) positions)."""
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    mask = k <= q
    if window > 0:
        mask &= q - k < window
    for first, stop in spans:
        inside = (q >= first) & (q < stop) & (k >= first) & (k < stop)
        mask |= inside
    return mask


def reference(q, k, v, n_head, n_head_kv, head_dim, mask):
    n = q.shape[0]
    qh = q.reshape(n, n_head, head_dim).astype(np.float64)
    kh = np.repeat(k.reshape(n, n_head_kv, head_dim), n_head // n_head_kv, axis=1)
    vh = np.repeat(v.reshape(n, n_head_kv, head_dim), n_head // n_head_kv, axis=1)
    scores = np.einsum("thd,shd->hts", qh, kh)
    scores = np.where(mask[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", weights, vh).reshape(n, n_head * head_dim)


def span_rows(n: int, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's span as the core takes it: first and last position (its own outside any)."""
    first = np.arange(n, dtype=np.int32)
    last = first.copy()
    for a, b in spans:
        first[a:b], last[a:b] = a, b - 1
    return first, last


CASES = [
    # n, n_head, n_head_kv, head_dim, window, spans
    (12, 2, 1, 32, 0, []),
    (40, 4, 2, 32, 16, []),
    (40, 4, 2, 32, 0, [(6, 30)]),
    (89, 4, 2, 32, 16, [(6, 69)]),  # the fixture's chat_image: an image longer than the window
    (94, 4, 2, 64, 16, [(3, 58), (60, 63)]),
    (50, 2, 2, 32, 4, [(0, 50)]),
]


@pytest.mark.parametrize(("n", "n_head", "n_head_kv", "head_dim", "window", "spans"), CASES)
def test_attention_equals_numpy(ops, n, n_head, n_head_kv, head_dim, window, spans):
    rng = np.random.default_rng(n + window)
    q = rng.normal(0, 1, (n, n_head * head_dim)).astype(np.float32)
    k = rng.normal(0, 1, (n, n_head_kv * head_dim)).astype(np.float32)
    v = rng.normal(0, 1, (n, n_head_kv * head_dim)).astype(np.float32)
    first, last = span_rows(n, spans) if spans else (np.empty(0, np.int32),) * 2
    out = ops.attention(q, k, v, n_head, n_head_kv, head_dim, window, first, last)
    expected = reference(q, k, v, n_head, n_head_kv, head_dim, allowed(n, window, spans))
    assert np.abs(out - expected).max() < 2e-5


def test_a_span_changes_what_its_rows_see_and_nothing_else(ops):
    """With a span, the first image row sees the image's last value, the row before the image
    and the rows after it do not see ahead, and the span's rows see past the window."""
    rng = np.random.default_rng(3)
    n, spans = 40, [(5, 30)]
    q, k, v = (rng.normal(0, 1, (n, 32)).astype(np.float32) for _ in range(3))
    first, last = span_rows(n, spans)
    causal = ops.attention(q, k, v, 1, 1, 32, 8, np.empty(0, np.int32), np.empty(0, np.int32))
    both = ops.attention(q, k, v, 1, 1, 32, 8, first, last)
    changed = np.abs(both - causal).max(axis=1) > 1e-4
    assert changed[5:30].all() and not changed[:5].any()
    # After the image the window alone decides: rows 30..36 see image rows, but only causally.
    np.testing.assert_array_equal(both[30:], causal[30:])


def test_spans_that_do_not_fit_are_refused(ops):
    q = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError, match="one position per row"):
        ops.attention(q, q, q, 1, 1, 32, 0, np.zeros(3, np.int32), np.zeros(3, np.int32))
