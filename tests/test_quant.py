"""The quant layer of the core: dequantization against gguf.quants, activation conversion against
an independent numpy model of llama.cpp's rounding, and the dot-product kernels (SIMD and scalar)
against float64 products of the dequantized operands."""

import ctypes
from collections.abc import Iterator
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from quant_samples import FLOAT_TYPES, WEIGHT_TYPES, block_size, random_weights, same_bits

from pygemma4 import _core

# The activation format each weight type is multiplied against (llama.cpp's vec_dot_type).
ACTIVATION = {
    T.F32: T.F32, T.F16: T.F16, T.BF16: T.BF16,
    T.Q4_0: T.Q8_0, T.Q5_0: T.Q8_0, T.Q8_0: T.Q8_0,
    T.Q4_1: T.Q8_1, T.Q5_1: T.Q8_1,
    T.Q2_K: T.Q8_K, T.Q3_K: T.Q8_K, T.Q4_K: T.Q8_K, T.Q5_K: T.Q8_K, T.Q6_K: T.Q8_K,
}  # fmt: skip

Q8_K_BYTES = 4 + 256 + 32


# --- dequantization -----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_match_gguf(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    n = 3 * max(block_size(qtype), 32)
    rows = random_weights(rng, qtype, 8, n)
    expected = gguf.quants.dequantize(rows, qtype)
    assert expected.shape == (8, n)
    for row, want in zip(rows, expected, strict=True):
        got = _core.dequantize(int(qtype), row, n)
        assert same_bits(got, want.astype(np.float32, copy=False))


def test_dequantize_fixture_tensors_match_gguf(fixtures_dir: Path) -> None:
    checked: set[str] = set()
    for path in sorted(fixtures_dir.glob("*/*.gguf")):
        for tensor in gguf.GGUFReader(path).tensors:
            raw = np.ascontiguousarray(tensor.data).view(np.uint8).ravel()
            n = int(tensor.n_elements)
            want = gguf.quants.dequantize(tensor.data, tensor.tensor_type).ravel()
            got = _core.dequantize(int(tensor.tensor_type), raw, n)
            assert same_bits(got, want.astype(np.float32, copy=False)), (path.name, tensor.name)
            checked.add(tensor.tensor_type.name)
    assert {"F32", "F16", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"} <= checked


# --- activation conversion: an independent model of llama.cpp's x86 rounding -------------------


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(np.float16).view(np.uint8)


def reference_activation(act_type: T, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if act_type == T.F32:
        return x.view(np.uint8)
    if act_type == T.F16:
        return fp16_bytes(x)
    if act_type == T.BF16:
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 64
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return np.where(is_nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)
    if act_type in (T.Q8_0, T.Q8_1):
        out = []
        for block in x.reshape(-1, 32):
            amax = np.max(np.abs(block))
            d = amax / np.float32(127)
            inv = np.float32(127) / amax if amax != 0 else np.float32(0)
            q = np.rint(block * inv)  # half to even, as _mm256_round_ps(_MM_ROUND_NEAREST)
            out.append(fp16_bytes([d]))
            if act_type == T.Q8_1:
                out.append(fp16_bytes([d * np.float32(q.sum())]))
            out.append(q.astype(np.int8).view(np.uint8))
        return np.concatenate(out)
    assert act_type == T.Q8_K
    out = []
    for block in x.reshape(-1, 256):
        signed_max = block[np.argmax(np.abs(block))]  # the first of equal magnitudes
        if signed_max == 0:
            out.append(np.zeros(Q8_K_BYTES, np.uint8))
            continue
        iscale = np.float32(-127) / signed_max
        q = np.minimum(127, np.rint(iscale * block)).astype(np.int8)
        bsums = q.reshape(16, 16).astype(np.int16).sum(axis=1, dtype=np.int16)
        out += [(np.float32(1) / iscale).reshape(1).view(np.uint8), q.view(np.uint8)]
        out.append(bsums.view(np.uint8))
    return np.concatenate(out)


def activation_inputs(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Random rows at several magnitudes, plus rows built to hit the rounding corner cases."""
    rows = [rng.standard_normal(n) * scale for scale in (1e-3, 1.0, 300.0)]
    rows.append(np.where(rng.random(n) < 0.5, 0.0, rng.standard_normal(n)))
    zero_block = rng.standard_normal(n)
    zero_block[:32] = 0.0
    rows.append(zero_block)
    # Exact halves under scale 1: a block whose max is 127 (or -127 for Q8_K's signed max) puts
    # x.5 values on ties, which round to even.
    ties = np.tile(np.arange(-63.5, 64.5, 1.0), n // 128 + 1)[:n].copy()
    ties[::32] = 127.0
    rows.append(ties)
    ties_negative = ties.copy()
    ties_negative[::32] = -127.0
    rows.append(ties_negative)
    # Equal magnitudes of opposite sign: Q8_K takes the sign of the first one.
    opposite = rng.uniform(-1, 1, n)
    opposite[::64] = -2.0
    opposite[32::64] = 2.0
    rows.append(opposite)
    tiny = rng.standard_normal(n) * 1e-6  # F16 subnormals and underflow
    rows.append(tiny)
    return [row.astype(np.float32) for row in rows]


@pytest.mark.parametrize(
    "act_type", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q8_1, T.Q8_K], ids=lambda t: t.name
)
def test_quantize_activation_matches_llama_rounding(act_type: T) -> None:
    rng = np.random.default_rng(100 + int(act_type))
    n = 512
    for x in activation_inputs(rng, n):
        got = _core.quantize_activation(int(act_type), x)
        want = reference_activation(act_type, x)
        assert got.dtype == np.uint8 and got.size == _core.row_bytes(int(act_type), n)
        assert np.array_equal(got, want)


def test_quantize_activation_rounds_ties_to_even() -> None:
    x = np.zeros(32, np.float32)
    x[:5] = [127.0, 0.5, 1.5, 2.5, -2.5]
    q = _core.quantize_activation(int(T.Q8_0), x)[2:].view(np.int8)
    assert q[:5].tolist() == [127, 0, 2, 2, -2]


# --- dot products -------------------------------------------------------------------------------


def decode_activation(act_type: T, raw: np.ndarray) -> np.ndarray:
    """The float64 values an activation row stands for."""
    if act_type == T.F32:
        return raw.view(np.float32).astype(np.float64)
    if act_type == T.F16:
        return raw.view(np.float16).astype(np.float64)
    if act_type == T.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if act_type == T.Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float64)
        return (d * blocks[:, 2:].view(np.int8)).ravel()
    if act_type == T.Q8_1:
        blocks = raw.reshape(-1, 36)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float64)
        return (d * blocks[:, 4:].view(np.int8)).ravel()
    blocks = raw.reshape(-1, Q8_K_BYTES)
    d = blocks[:, :4].copy().view(np.float32).astype(np.float64)
    return (d * blocks[:, 4:260].view(np.int8)).ravel()


def expected_dot(qtype: T, row: np.ndarray, act: np.ndarray, n: int) -> tuple[float, float]:
    """(float64 product of the dequantized operands, sum of |terms| for the tolerance).

    For Q4_1 / Q5_1 the minimum term uses the activation block's stored fp16 sum s, as
    llama.cpp does, rather than the exact sum of its values."""
    w = gguf.quants.dequantize(row, qtype).astype(np.float64).ravel()
    a = decode_activation(ACTIVATION[qtype], act)
    if qtype not in (T.Q4_1, T.Q5_1):
        return float(np.dot(w, a)), float(np.abs(w * a).sum())
    blocks = row.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64).ravel()
    s = act.reshape(-1, 36)[:, 2:4].copy().view(np.float16).astype(np.float64).ravel()
    scaled = (w.reshape(-1, 32) - m[:, None]) * a.reshape(-1, 32)
    total = scaled.sum() + np.dot(m, s)
    return float(total), float(np.abs(scaled).sum() + np.abs(m * s).sum())


@pytest.mark.parametrize("act_type", [T.Q8_0, T.Q8_1, T.Q8_K], ids=lambda t: t.name)
def test_dequantize_activation_formats(act_type: T) -> None:
    # Each value is d * q rounded once to float32, so the float64 decode rounds to the same bits.
    rng = np.random.default_rng(300 + int(act_type))
    x = (rng.standard_normal(512) * 5).astype(np.float32)
    act = _core.quantize_activation(int(act_type), x)
    got = _core.dequantize(int(act_type), act, 512)
    assert same_bits(got, decode_activation(act_type, act).astype(np.float32))


def dot_lengths(qtype: T) -> list[int]:
    if qtype in FLOAT_TYPES:
        return [1, 7, 8, 33, 100, 256, 1000, 4096]
    size = block_size(qtype)
    return [size * k for k in (1, 2, 3, 5, 8, 16)]


ISAS = _core.cpu_isas()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_vec_dot_matches_float64_reference(qtype: T, isa: str) -> None:
    rng = np.random.default_rng(1000 + int(qtype))
    act_type = ACTIVATION[qtype]
    for n in dot_lengths(qtype):
        for trial in range(4):
            row = random_weights(rng, qtype, 1, n)[0]
            x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
            act = _core.quantize_activation(int(act_type), x)
            got = _core.vec_dot(int(qtype), row, act, n, isa=isa)
            want, magnitude = expected_dot(qtype, row, act, n)
            assert abs(got - want) <= 1e-5 * magnitude, (n, trial, got, want)


@pytest.mark.parametrize("isa", ISAS[1:])
@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_vec_dot_simd_agrees_with_scalar(qtype: T, isa: str) -> None:
    rng = np.random.default_rng(2000 + int(qtype))
    act_type = ACTIVATION[qtype]
    n = 64 * max(block_size(qtype), 32)
    for _ in range(8):
        row = random_weights(rng, qtype, 1, n)[0]
        act = _core.quantize_activation(int(act_type), rng.standard_normal(n).astype(np.float32))
        simd = _core.vec_dot(int(qtype), row, act, n, isa=isa)
        scalar = _core.vec_dot(int(qtype), row, act, n, isa="scalar")
        _, magnitude = expected_dot(qtype, row, act, n)
        assert abs(simd - scalar) <= 1e-5 * magnitude


def fixture_matrices(fixtures_dir: Path) -> Iterator[tuple[str, T, int, np.ndarray]]:
    """(name, type, row length, first three raw rows) of every matrix of the mixed-type fixture
    models: real weight distributions."""
    models = sorted(fixtures_dir.glob("*/model-Q4_K_M.gguf"))
    assert models
    for path in models:
        for tensor in gguf.GGUFReader(path).tensors:
            if len(tensor.data.shape) == 2:
                rows = np.ascontiguousarray(tensor.data[:3]).view(np.uint8)
                yield tensor.name, tensor.tensor_type, int(tensor.shape[0]), rows


def test_vec_dot_fixture_rows(fixtures_dir: Path) -> None:
    """A few rows of every matrix of the fixture models against float64."""
    rng = np.random.default_rng(7)
    for name, qtype, n, rows in fixture_matrices(fixtures_dir):
        for row in rows:
            x = rng.standard_normal(n).astype(np.float32)
            act = _core.quantize_activation(int(ACTIVATION[qtype]), x)
            want, magnitude = expected_dot(qtype, row, act, n)
            for isa in ISAS:
                got = _core.vec_dot(int(qtype), row, act, n, isa=isa)
                assert abs(got - want) <= 1e-5 * magnitude, (name, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_vec_dot_multi_is_vec_dot_on_each_row(qtype: T, isa: str) -> None:
    """The batched kernel a matmul uses gives, bit for bit, the single-row kernel's product for
    every activation row (so prefill and decode agree), whatever the batch size."""
    rng = np.random.default_rng(3000 + int(qtype))
    act_type = ACTIVATION[qtype]
    size = block_size(qtype)
    for n in (size, 5 * max(size, 32), 9 * max(size, 32)):
        row = random_weights(rng, qtype, 1, n)[0]
        for n_acts in (1, 3, 8, 13, 64):
            acts = np.stack(
                [
                    _core.quantize_activation(
                        int(act_type),
                        (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32),
                    )
                    for _ in range(n_acts)
                ]
            )
            got = _core.vec_dot_multi(int(qtype), row, acts, n, isa=isa)
            want = np.array(
                [_core.vec_dot(int(qtype), row, act, n, isa=isa) for act in acts], np.float32
            )
            assert got.shape == (n_acts,)
            assert same_bits(got, want), (n, n_acts)


def test_vec_dot_multi_fixture_rows(fixtures_dir: Path) -> None:
    """The same on rows of every matrix of the fixture models, activations shared."""
    rng = np.random.default_rng(8)
    for name, qtype, n, rows in fixture_matrices(fixtures_dir):
        x = rng.standard_normal((13, n)).astype(np.float32)
        acts = np.stack([_core.quantize_activation(int(ACTIVATION[qtype]), v) for v in x])
        for row in rows:
            got = _core.vec_dot_multi(int(qtype), row, acts, n)
            want = np.array([_core.vec_dot(int(qtype), row, a, n) for a in acts], np.float32)
            assert same_bits(got, want), name


# --- cross-check against llama.cpp's own CPU backend, where llama-cpp-python is installed ------


class GgmlTypeTraitsCpu(ctypes.Structure):
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


GgmlFromFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
GgmlVecDot = ctypes.CFUNCTYPE(
    None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
)  # fmt: skip


@pytest.fixture(scope="module")
def ggml_cpu():
    """ggml_get_type_traits_cpu of the libggml-cpu that ships with llama-cpp-python."""
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    if not path.exists():
        pytest.skip(f"no {path}")
    lib = ctypes.CDLL(str(path))
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(GgmlTypeTraitsCpu)
    lib.ggml_cpu_init()
    return lambda qtype: lib.ggml_get_type_traits_cpu(int(qtype)).contents


@pytest.mark.parametrize("act_type", [T.F16, T.BF16, T.Q8_0, T.Q8_1, T.Q8_K], ids=lambda t: t.name)
def test_quantize_activation_matches_ggml(ggml_cpu, act_type: T) -> None:
    from_float = GgmlFromFloat(ggml_cpu(act_type).from_float)
    rng = np.random.default_rng(400 + int(act_type))
    n = 1024
    rows = activation_inputs(rng, n) + [
        (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 3)).astype(np.float32) for _ in range(50)
    ]
    for x in rows:
        ours = _core.quantize_activation(int(act_type), x)
        theirs = np.zeros_like(ours)
        from_float(x.ctypes.data, theirs.ctypes.data, n)
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
def test_vec_dot_matches_ggml(ggml_cpu, qtype: T) -> None:
    traits = ggml_cpu(qtype)
    assert traits.vec_dot_type == int(ACTIVATION[qtype])
    vec_dot = GgmlVecDot(traits.vec_dot)
    rng = np.random.default_rng(500 + int(qtype))
    n = 16 * max(block_size(qtype), 32)
    for _ in range(8):
        row = random_weights(rng, qtype, 1, n)[0]
        act = _core.quantize_activation(
            int(ACTIVATION[qtype]), rng.standard_normal(n).astype(np.float32)
        )
        theirs = ctypes.c_float()
        vec_dot(n, ctypes.addressof(theirs), 0, row.ctypes.data, 0, act.ctypes.data, 0, 1)
        _, magnitude = expected_dot(qtype, row, act, n)
        assert abs(_core.vec_dot(int(qtype), row, act, n) - theirs.value) <= 1e-5 * magnitude


# --- sizes and bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [*WEIGHT_TYPES, T.Q8_K], ids=lambda t: t.name)
def test_row_bytes_match_gguf(qtype: T) -> None:
    size, type_bytes = GGML_QUANT_SIZES[qtype]
    assert _core.row_bytes(int(qtype), 4 * size) == 4 * type_bytes


def test_q8_1_block_is_ggml_layout() -> None:
    # gguf-py still lists 40 bytes (float d and s) for Q8_1; ggml's block_q8_1 has two fp16
    # fields, 36 bytes. Q8_1 never occurs in a file, only as an activation format.
    assert _core.row_bytes(int(T.Q8_1), 64) == 2 * 36


@pytest.mark.parametrize("type_id", [-1, 4, 5, 16, 29, 31, 39, 1000])
def test_unknown_type_id_is_rejected(type_id: int) -> None:
    with pytest.raises(ValueError, match="unknown"):
        _core.dequantize(type_id, np.zeros(1024, np.uint8), 32)
    with pytest.raises(ValueError, match="unknown"):
        _core.quantize_activation(type_id, np.zeros(256, np.float32))
    with pytest.raises(ValueError, match="unknown"):
        _core.vec_dot(type_id, np.zeros(1024, np.uint8), np.zeros(1024, np.uint8), 32)
    with pytest.raises(ValueError, match="unknown"):
        _core.vec_dot_multi(type_id, np.zeros(1024, np.uint8), np.zeros((2, 1024), np.uint8), 32)
    with pytest.raises(ValueError, match="unknown"):
        _core.row_bytes(type_id, 256)


def test_bad_lengths_and_buffers_are_rejected() -> None:
    q4 = int(T.Q4_0)
    with pytest.raises(ValueError, match="multiple"):
        _core.dequantize(q4, np.zeros(18, np.uint8), 31)
    with pytest.raises(ValueError, match="multiple"):
        _core.dequantize(q4, np.zeros(18, np.uint8), 0)
    with pytest.raises(ValueError, match="multiple"):
        _core.row_bytes(int(T.Q4_K), 128)
    with pytest.raises(ValueError, match="multiple"):
        _core.quantize_activation(int(T.Q8_K), np.zeros(255, np.float32))
    with pytest.raises(ValueError, match="too small"):
        _core.dequantize(q4, np.zeros(17, np.uint8), 32)
    with pytest.raises(ValueError, match="too small"):
        _core.dequantize(int(T.F32), np.zeros(15, np.uint8), 4)
    act = _core.quantize_activation(int(T.Q8_0), np.ones(64, np.float32))
    with pytest.raises(ValueError, match="too small"):
        _core.vec_dot(q4, np.zeros(35, np.uint8), act, 64)
    with pytest.raises(ValueError, match="too small"):
        _core.vec_dot(q4, np.zeros(36, np.uint8), act[:-1], 64)
    with pytest.raises(ValueError, match="multiple"):
        _core.vec_dot(q4, np.zeros(36, np.uint8), act, 48)


def test_vec_dot_multi_rejects_bad_arguments() -> None:
    q4 = int(T.Q4_0)
    act = _core.quantize_activation(int(T.Q8_0), np.ones(64, np.float32))
    acts = np.stack([act, act])
    weights = np.zeros(36, np.uint8)
    assert _core.vec_dot_multi(q4, weights, acts, 64).tolist() == [0.0, 0.0]
    assert _core.vec_dot_multi(q4, weights, acts[:0], 64).shape == (0,)
    with pytest.raises(ValueError, match="unknown"):
        _core.vec_dot_multi(1000, weights, acts, 64)
    with pytest.raises(ValueError, match="not a weight type"):
        _core.vec_dot_multi(int(T.Q8_K), np.zeros(292, np.uint8), np.zeros((2, 292), np.uint8), 256)
    with pytest.raises(ValueError, match="2-D"):
        _core.vec_dot_multi(q4, weights, act, 64)
    with pytest.raises(ValueError, match="multiple"):
        _core.vec_dot_multi(q4, weights, acts, 48)
    with pytest.raises(ValueError, match="too small"):
        _core.vec_dot_multi(q4, weights[:-1], acts, 64)
    with pytest.raises(ValueError, match="too small"):
        _core.vec_dot_multi(q4, weights, acts[:, :-1], 64)


@pytest.mark.parametrize("qtype", [T.Q8_1, T.Q8_K], ids=lambda t: t.name)
def test_activation_only_types_are_not_weights(qtype: T) -> None:
    size, type_bytes = GGML_QUANT_SIZES[qtype]
    raw = np.zeros(type_bytes, np.uint8)
    with pytest.raises(ValueError, match="not a weight type"):
        _core.vec_dot(int(qtype), raw, raw, size)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q6_K], ids=lambda t: t.name)
def test_weight_only_types_are_not_activation_formats(qtype: T) -> None:
    with pytest.raises(ValueError, match="not an activation format"):
        _core.quantize_activation(int(qtype), np.zeros(256, np.float32))
