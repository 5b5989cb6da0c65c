"""The backend operations that the Ops interface defines in terms of others, on the CPU backend
(test_cuda.py runs each op of the CUDA backend against the CPU's)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from quant_samples import random_weights, same_bits

from pygemma4 import _core


@pytest.mark.parametrize("n_tokens", [1, 5, 70])
def test_matmul_shared_gives_each_matmul_bit_for_bit(n_tokens: int) -> None:
    ops = _core.OpsCheck("cpu", threads=2)
    rng = np.random.default_rng(n_tokens)
    cols = 512
    # Activation formats Q8_K, F16, Q8_0, Q8_K again, Q8_1 and F32 in turn; 48 and 64 rows make
    # interleaved copies of the Q4_K and Q6_K matrices, 40 rows do not.
    shapes = ((T.Q4_K, 48), (T.F16, 20), (T.Q8_0, 36), (T.Q6_K, 64), (T.Q5_1, 8), (T.Q4_K, 40))
    matrices = [
        (int(qtype), random_weights(rng, qtype, rows, cols), cols, rows) for qtype, rows in shapes
    ] + [(int(T.F32), rng.standard_normal((16, cols)).astype(np.float32).view(np.uint8), cols, 16)]
    x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
    products = ops.matmul_shared(matrices, x)
    assert len(products) == len(matrices)
    for (type_id, weights, _, rows), product in zip(matrices, products, strict=True):
        assert product.shape == (n_tokens, rows)
        assert same_bits(product, ops.matmul(type_id, weights, cols, rows, x))


def float_values(qtype: T, raw: np.ndarray) -> np.ndarray:
    """The float64 values of rows of F32, F16 or BF16 given as raw bytes."""
    if qtype == T.F32:
        return raw.view(np.float32).astype(np.float64)
    if qtype == T.F16:
        return raw.view(np.float16).astype(np.float64)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("isa", _core.cpu_isas())
@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_a_float_matmul_gives_each_token_the_bits_it_gets_alone(monkeypatch, qtype, isa) -> None:
    """Batches of float weights go through register tiles (from 8 tokens, AVX-512), a token alone
    through the row kernel: the same bits, whatever the batch. Rows and tokens not whole tiles (4
    rows, 6 tokens, a thread's band of rows), rows whose length is a multiple of 64, of 16 only
    (the row kernel's 16-wide tail) and of neither (left to the row kernel), wide ones that take
    more than one block of rows per thread."""
    monkeypatch.setenv("PYGEMMA4_CPU_KERNELS", isa)
    ops = _core.OpsCheck("cpu", threads=2)
    rng = np.random.default_rng(int(qtype))
    for cols, rows in ((64, 1), (144, 37), (80, 9), (40, 6), (768, 13), (3072, 70)):
        weights = random_weights(rng, qtype, rows, cols)
        for n_tokens in (2, 7, 8, 13, 20):
            x = (rng.standard_normal((n_tokens, cols)) * 10.0 ** rng.uniform(-3, 3)).astype(
                np.float32
            )
            got = ops.matmul(int(qtype), weights, cols, rows, x)
            alone = np.concatenate(
                [ops.matmul(int(qtype), weights, cols, rows, t[None]) for t in x]
            )
            assert same_bits(got, alone), (cols, rows, n_tokens)
            # The plain reference: the activations rounded to the weights' format, in float64.
            acts = np.stack(
                [float_values(qtype, _core.quantize_activation(int(qtype), t)) for t in x]
            )
            w = float_values(qtype, weights)
            want = acts @ w.T
            scale = np.abs(acts) @ np.abs(w).T
            assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-30), (cols, rows, n_tokens)


def test_matmul_shared_needs_weights_of_one_width() -> None:
    ops = _core.OpsCheck("cpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    narrow = (int(T.Q8_0), random_weights(rng, T.Q8_0, 4, 256), 256, 4)
    wide = (int(T.Q8_0), random_weights(rng, T.Q8_0, 4, 512), 512, 4)
    with pytest.raises(ValueError, match="one width, not 256 and 512"):
        ops.matmul_shared([narrow, wide], x)
    assert ops.matmul_shared([], x) == []


def masked_reference(
    logits: np.ndarray, scores: np.ndarray, top_k: int, clusters: np.ndarray
) -> np.ndarray:
    """The centroid-masked head from every token's logits: per row, the tokens of the top_k
    clusters by score (the lower index first on ties) keep theirs, every other token gets the
    lowest of those minus 1."""
    out = np.empty_like(logits)
    for r, row in enumerate(logits):
        chosen = np.argsort(-scores[r], kind="stable")[:top_k]
        tokens = clusters[chosen].reshape(-1)
        out[r] = row[tokens].min() - 1
        out[r, tokens] = row[tokens]
    return out


def clustered_case(rng: np.random.Generator, n: int, n_clusters: int, cluster_size: int):
    """Scores of n rows over the clusters (row 0 all tied, so the lowest indices win) and the
    clusters of a random permutation of the vocabulary."""
    scores = rng.standard_normal((n, n_clusters)).astype(np.float32)
    scores[0] = 0.5
    clusters = rng.permutation(n_clusters * cluster_size).astype(np.int32)
    return scores, clusters.reshape(n_clusters, cluster_size)


def test_clustered_logits_of_an_f32_table_equal_a_plain_reference() -> None:
    ops = _core.OpsCheck("cpu", threads=2)
    rng = np.random.default_rng(11)
    n, cols, n_clusters, cluster_size, top_k = 5, 96, 12, 40, 3
    table = rng.standard_normal((n_clusters * cluster_size, cols)).astype(np.float32)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    scores, clusters = clustered_case(rng, n, n_clusters, cluster_size)
    got = ops.clustered_logits(
        int(T.F32), table.view(np.uint8), cols, len(table), x, scores, top_k, clusters
    )
    want = masked_reference(
        x.astype(np.float64) @ table.T.astype(np.float64), scores, top_k, clusters
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert set(np.flatnonzero(got[0] > got[0].min())) == set(clusters[:top_k].reshape(-1).tolist())


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.F16, T.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 7])
def test_clustered_logits_are_the_matmuls_logits_of_the_chosen_clusters(qtype, n) -> None:
    """Each scored token's logit is bit for bit what matmul gives it (600 rows: no interleaved
    copy, the same dot kernel); the rest are masked as the reference masks them."""
    ops = _core.OpsCheck("cpu", threads=2)
    rng = np.random.default_rng(int(qtype) + n)
    cols, n_clusters, cluster_size, top_k = 256, 12, 50, 4
    rows = n_clusters * cluster_size
    table = random_weights(rng, qtype, rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    scores, clusters = clustered_case(rng, n, n_clusters, cluster_size)
    got = ops.clustered_logits(int(qtype), table, cols, rows, x, scores, top_k, clusters)
    want = masked_reference(ops.matmul(int(qtype), table, cols, rows, x), scores, top_k, clusters)
    assert same_bits(got, want)


def test_softcap_is_cap_times_tanh() -> None:
    """The vectorised tanh against float64's, across the range where each of its two forms
    serves (below a quarter, the series; above, the exponential) and where it saturates."""
    ops = _core.OpsCheck("cpu", threads=2)
    rng = np.random.default_rng(1)
    cap = 30.0
    x = np.concatenate(
        [
            rng.standard_normal(100_003) * 10.0 ** rng.uniform(-6, 3, 100_003),
            [0.0, -0.0, 7.5, -7.5, 7.4999995, 1e-30, -1e-30, 1e4, -1e4, 3e38, -3e38],
        ]
    ).astype(np.float32)
    got = ops.elementwise("softcap", x, cap).astype(np.float64)
    want = cap * np.tanh(x.astype(np.float64) / np.float32(cap))
    assert np.all(np.abs(got - want) <= 4e-7 * np.abs(want) + 1e-37)
    assert np.array_equal(np.signbit(got), np.signbit(x))
    assert np.abs(got).max() <= cap


def test_gelu_mul_is_the_tanh_gelu_times_up() -> None:
    ops = _core.OpsCheck("cpu", threads=2)
    rng = np.random.default_rng(2)
    gate = (rng.standard_normal((7, 3001)) * 10.0 ** rng.uniform(-3, 2, (7, 3001))).astype(
        np.float32
    )
    gate[0, :6] = [0.0, -0.0, 100.0, -100.0, 1e-20, -1e-20]
    up = rng.standard_normal(gate.shape).astype(np.float32)
    got = ops.gelu_mul(gate, up).astype(np.float64)
    g = gate.astype(np.float64)
    want = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3))) * up
    assert np.all(np.abs(got - want) <= 2e-6 * np.abs(g * up) + 1e-37)
