"""Random GGUF weight rows for the kernel tests (the weight types the core reads, and valid
blocks of each with random quant bits and finite scales), and bitwise comparison of results."""

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

WEIGHT_TYPES = [
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
]  # fmt: skip
FLOAT_TYPES = [T.F32, T.F16, T.BF16]

# Byte offsets of the fp16 scale fields inside one block; the rest of a block is quant bits.
FP16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}  # fmt: skip


def block_size(qtype: T) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def random_weights(rng: np.random.Generator, qtype: T, n_rows: int, n: int) -> np.ndarray:
    """n_rows rows of n values as raw bytes (n_rows, row_bytes): random quant bits with finite
    fp16 scales of random sign and a wide range of magnitudes (subnormals included)."""
    if qtype == T.F32:
        return rng.standard_normal((n_rows, n)).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal((n_rows, n)).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        bits = rng.standard_normal((n_rows, n)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    size, type_bytes = GGML_QUANT_SIZES[qtype]
    n_blocks = n_rows * n // size
    blocks = rng.integers(0, 256, size=(n_blocks, type_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scale = rng.uniform(-1, 1, n_blocks) * np.exp2(rng.integers(-20, 4, n_blocks))
        blocks[:, offset : offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n_rows, -1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two float32 arrays hold the same bits (so -0.0 and 0.0, or two NaNs, count)."""
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))
