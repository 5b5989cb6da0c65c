"""The interleaved weight layout of the CPU matrix kernels: repacking 16 rows and back, the SIMD
kernel against its portable reference (bit for bit), and both against the row kernels."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from quant_samples import random_weights, same_bits

from pygemma4 import _core

INTERLEAVED_TYPES = [T.Q4_K, T.Q6_K]
ROWS = 16


def activations(rng: np.random.Generator, count: int, n: int) -> np.ndarray:
    """count Q8_K rows of n values, of magnitudes from 1e-3 to 1e3."""
    return np.stack(
        [
            _core.quantize_activation(
                int(T.Q8_K),
                (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32),
            )
            for _ in range(count)
        ]
    )


needs_kernel = pytest.mark.skipif(
    not _core.interleaved_kernel_built(int(T.Q4_K)),
    reason="this build has no interleaved kernel (it needs AVX-512 VNNI)",
)


@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
def test_interleave_then_deinterleave_gives_the_rows_back(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    for n in (256, 768, 2560):
        rows = random_weights(rng, qtype, ROWS, n)
        group = _core.interleave_rows(int(qtype), rows, n)
        assert group.nbytes == rows.nbytes
        for r in range(ROWS):
            assert np.array_equal(_core.deinterleave_row(int(qtype), group, r, n), rows[r])


@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
def test_reference_matches_the_row_kernels(qtype: T) -> None:
    """The reference of the interleaved layout computes each row's product with the exact
    integer sums of the scalar row kernel; only the float steps differ."""
    rng = np.random.default_rng(100 + int(qtype))
    for n in (256, 1280):
        rows = random_weights(rng, qtype, ROWS, n)
        acts = activations(rng, 5, n)
        got = _core.interleaved_dot(
            int(qtype), _core.interleave_rows(int(qtype), rows, n), acts, n, reference=True
        )
        weights = quants.dequantize(rows, qtype).astype(np.float64)
        for t, act in enumerate(acts):
            values = _core.dequantize(int(T.Q8_K), act, n).astype(np.float64)
            for r in range(ROWS):
                want = _core.vec_dot(int(qtype), rows[r], act, n, isa="scalar")
                magnitude = float(np.abs(weights[r] * values).sum())
                assert abs(got[t, r] - want) <= 1e-5 * magnitude, (n, t, r)


@needs_kernel
@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
def test_kernel_matches_its_reference_bit_for_bit(qtype: T) -> None:
    rng = np.random.default_rng(200 + int(qtype))
    for n in (256, 512, 2560):
        group = _core.interleave_rows(int(qtype), random_weights(rng, qtype, ROWS, n), n)
        for count in range(1, 9):
            acts = activations(rng, count, n)
            got = _core.interleaved_dot(int(qtype), group, acts, n)
            want = _core.interleaved_dot(int(qtype), group, acts, n, reference=True)
            assert got.shape == (count, ROWS)
            assert same_bits(got, want), (n, count)


@needs_kernel
@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
def test_kernel_matches_its_reference_at_the_integer_extremes(qtype: T) -> None:
    """Every activation at full scale with one sign (the largest block sums, which the kernel
    adds in pairs of sub-blocks) against weights whose scale and minimum bytes are all ones
    (the largest sub-block scales and minimums)."""
    rng = np.random.default_rng(400 + int(qtype))
    n = 768
    rows = random_weights(rng, qtype, ROWS, n)
    row_bytes = rows.shape[1] // (n // 256)
    blocks = rows.reshape(ROWS, n // 256, row_bytes)
    scale_bytes = slice(4, 16) if qtype == T.Q4_K else slice(192, 208)
    blocks[:, :, scale_bytes] = 0xFF if qtype == T.Q4_K else 0x7F
    group = _core.interleave_rows(int(qtype), blocks.reshape(ROWS, -1), n)
    for sign in (1.0, -1.0):
        for count in range(1, 9):
            acts = np.stack(
                [
                    _core.quantize_activation(int(T.Q8_K), np.full(n, sign * (t + 1), np.float32))
                    for t in range(count)
                ]
            )
            got = _core.interleaved_dot(int(qtype), group, acts, n)
            want = _core.interleaved_dot(int(qtype), group, acts, n, reference=True)
            assert same_bits(got, want), (sign, count)


@needs_kernel
@pytest.mark.parametrize("qtype", INTERLEAVED_TYPES, ids=lambda t: t.name)
def test_a_tile_gives_each_token_the_bits_it_gets_alone(qtype: T) -> None:
    """So a batch of sequences decodes exactly as each would one at a time."""
    rng = np.random.default_rng(300 + int(qtype))
    n = 1024
    group = _core.interleave_rows(int(qtype), random_weights(rng, qtype, ROWS, n), n)
    acts = activations(rng, 8, n)
    together = _core.interleaved_dot(int(qtype), group, acts, n)
    for t in range(8):
        assert same_bits(
            together[t], _core.interleaved_dot(int(qtype), group, acts[t : t + 1], n)[0]
        )


def test_bad_arguments_are_rejected() -> None:
    rows = np.zeros((ROWS, 144), np.uint8)
    group = _core.interleave_rows(int(T.Q4_K), rows, 256)
    act = np.zeros((1, 292), np.uint8)
    with pytest.raises(ValueError, match="no interleaved layout"):
        _core.interleave_rows(int(T.Q4_0), np.zeros((ROWS, 18), np.uint8), 32)
    with pytest.raises(ValueError, match="16 rows"):
        _core.interleave_rows(int(T.Q4_K), rows[:15], 256)
    with pytest.raises(ValueError, match="multiple"):
        _core.interleave_rows(int(T.Q4_K), rows, 100)
    with pytest.raises(ValueError, match="too small"):
        _core.deinterleave_row(int(T.Q4_K), group[:-1], 0, 256)
    with pytest.raises(ValueError, match="0..15"):
        _core.deinterleave_row(int(T.Q4_K), group, 16, 256)
    with pytest.raises(ValueError, match="between 1 and 8"):
        _core.interleaved_dot(int(T.Q4_K), group, np.zeros((9, 292), np.uint8), 256, reference=True)
    with pytest.raises(ValueError, match="too small"):
        _core.interleaved_dot(int(T.Q4_K), group, act[:, :-1], 256, reference=True)
    with pytest.raises(ValueError, match="unknown CPU kernel set 'sse9'"):
        _core.vec_dot(int(T.Q4_K), rows[0], act[0], 256, isa="sse9")
