"""The CUDA backend: each kernel against its CPU reference (the CPU backend's op) on fresh random
inputs, whole models against the same outside references as the CPU engine, captured steps
against eager ones. Tests that need a GPU are marked `cuda` and skip, saying why, where CUDA is
unavailable; the build checks run everywhere."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from quant_samples import WEIGHT_TYPES, random_weights, same_bits
from serve_helpers import ServeProcess, run_serve

from pygemma4 import Engine, _core
from pygemma4.kv import KvLayout
from pygemma4.runner import BackendUnavailableError, ForwardBatch
from pygemma4.sampling import SamplingParams

CUDA_REASON = _core.cuda_unavailable_reason(0)
needs_gpu = pytest.mark.skipif(bool(CUDA_REASON), reason=f"CUDA unavailable: {CUDA_REASON}")
cuda = [pytest.mark.cuda, needs_gpu]

E_TYPES = ["f32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]
MOE_TYPES = ["Q8_0", "Q4_K_M"]
N_PROMPTS = 3
N_GREEDY = 24


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert np.isfinite(got).all(), "non-finite output"
    return float(np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-30))


# --- the build --------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_the_cuda_backend_is_compiled_where_a_toolkit_exists():
    assert _core.cuda_built()


@pytest.mark.skipif(not CUDA_REASON, reason="this machine can run CUDA")
def test_without_a_gpu_cuda_is_refused_with_the_reason(demo_model_file):
    with pytest.raises(BackendUnavailableError, match="CUDA is unavailable: .+"):
        Engine(demo_model_file, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA is unavailable"):
        _core.OpsCheck("cuda")
    # The module still runs on the CPU.
    assert Engine(demo_model_file, threads=1).forward([1, 2, 3]).shape[0] == 3


def test_bad_backend_and_device_are_named(demo_model_file):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        Engine(demo_model_file, backend="tpu")
    with pytest.raises(ValueError, match="device must be an integer >= 0"):
        Engine(demo_model_file, backend="cuda", device=-1)


# --- kernels against the CPU --------------------------------------------------------------------


@pytest.fixture(scope="module")
def backends():
    return _core.OpsCheck("cpu", threads=2), _core.OpsCheck("cuda", device=0)


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 3, 8, 37, 130])
@pytest.mark.cuda
@needs_gpu
def test_matmul_matches_cpu(backends, qtype, n_tokens):
    cpu, gpu = backends
    rng = np.random.default_rng([int(qtype), n_tokens])
    rows, cols = 300, 512
    weights = random_weights(rng, qtype, rows, cols)
    x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
    want = cpu.matmul(int(qtype), weights, cols, rows, x)
    got = gpu.matmul(int(qtype), weights, cols, rows, x)
    # For quantized weights both convert the activations to 8 bits, in blocks of different
    # sizes; for half-precision weights the CPU rounds the activations to the weights' format.
    limit = {T.F32: 1e-5, T.F16: 1e-3, T.BF16: 5e-3}.get(qtype, 2e-2)
    assert relative_error(got, want) < limit


@pytest.mark.parametrize("n_tokens", [1, 37])
@pytest.mark.cuda
@needs_gpu
def test_matmul_shared_is_each_matmul_and_matches_cpu(backends, n_tokens):
    cpu, gpu = backends
    rng = np.random.default_rng(n_tokens)
    cols = 512
    matrices = [
        (int(qtype), random_weights(rng, qtype, rows, cols), cols, rows)
        for qtype, rows in ((T.Q4_K, 48), (T.F16, 20), (T.Q8_0, 36), (T.Q6_K, 64))
    ]
    x = rng.standard_normal((n_tokens, cols)).astype(np.float32)
    got = gpu.matmul_shared(matrices, x)
    want = cpu.matmul_shared(matrices, x)
    for (type_id, weights, _, rows), product, reference in zip(matrices, got, want, strict=True):
        assert same_bits(product, gpu.matmul(type_id, weights, cols, rows, x))
        assert relative_error(product, reference) < 2e-2


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda t: t.name)
@pytest.mark.cuda
@needs_gpu
def test_get_rows_matches_cpu_exactly(backends, qtype):
    cpu, gpu = backends
    rng = np.random.default_rng(int(qtype))
    rows, cols = 50, 512
    table = random_weights(rng, qtype, rows, cols)
    ids = rng.integers(0, rows, 17).astype(np.int32)
    want = cpu.get_rows(int(qtype), table, cols, rows, ids, 1.5)
    got = gpu.get_rows(int(qtype), table, cols, rows, ids, 1.5)
    assert relative_error(got, want) < 1e-6


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_and_its_residual_add_match_cpu(backends, with_weight):
    cpu, gpu = backends
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 2560)).astype(np.float32) * 5
    w = rng.standard_normal(2560).astype(np.float32) if with_weight else None
    residual = rng.standard_normal((7, 2560)).astype(np.float32)
    assert relative_error(gpu.rms_norm(x, w, 1e-6), cpu.rms_norm(x, w, 1e-6)) < 1e-5
    assert (
        relative_error(gpu.rms_norm(x, w, 1e-6, residual), cpu.rms_norm(x, w, 1e-6, residual))
        < 1e-5
    )


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize(("head_dim", "n_rot", "factors"), [(256, 256, False), (512, 128, True)])
def test_norm_rope_matches_cpu(backends, normalise, head_dim, n_rot, factors):
    cpu, gpu = backends
    rng = np.random.default_rng(head_dim)
    n, n_head = 5, 4
    x = rng.standard_normal((n, n_head * head_dim)).astype(np.float32)
    w = rng.standard_normal(head_dim).astype(np.float32) if normalise else None
    positions = np.array([0, 1, 77, 4095, 131071], np.int32)
    ff = rng.uniform(1, 30, n_rot // 2).astype(np.float32) if factors else None
    args = (positions, n_head, head_dim, 1e-6, n_rot, 1e6 if factors else 1e4, ff)
    assert relative_error(gpu.norm_rope(x, w, *args), cpu.norm_rope(x, w, *args)) < 1e-5


@pytest.mark.cuda
@needs_gpu
def test_element_wise_ops_match_cpu(backends):
    cpu, gpu = backends
    rng = np.random.default_rng(5)
    gate = rng.standard_normal((6, 1000)).astype(np.float32) * 4
    up = rng.standard_normal((6, 1000)).astype(np.float32)
    assert relative_error(gpu.gelu_mul(gate, up), cpu.gelu_mul(gate, up)) < 1e-5
    x = rng.standard_normal(10000).astype(np.float32) * 50
    y = rng.standard_normal(10000).astype(np.float32)
    for op, value in (("scale", 0.37), ("softcap", 30.0)):
        assert relative_error(gpu.elementwise(op, x, value), cpu.elementwise(op, x, value)) < 1e-6
    assert relative_error(gpu.elementwise("add", x, y=y), cpu.elementwise("add", x, y=y)) < 1e-7


@pytest.mark.cuda
@needs_gpu
def test_argmax_and_its_logprob_match_cpu(backends):
    cpu, gpu = backends
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 262144)).astype(np.float32) * 10
    x[3, [100, 200000]] = x[3].max() + 1  # a tie goes to the lower id
    want_ids, want_lp = cpu.argmax(x)
    got_ids, got_lp = gpu.argmax(x)
    np.testing.assert_array_equal(got_ids, want_ids)
    assert got_ids[3] == 100
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("qtype", [T.Q8_0, T.F32], ids=lambda t: t.name)
def test_clustered_logits_match_cpu(backends, qtype):
    cpu, gpu = backends
    rng = np.random.default_rng(int(qtype))
    n, cols, n_clusters, cluster_size, top_k = 3, 256, 32, 64, 4
    rows = n_clusters * cluster_size
    table = random_weights(rng, qtype, rows, cols)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    scores = rng.standard_normal((n, n_clusters)).astype(np.float32)
    clusters = rng.permutation(rows).astype(np.int32).reshape(n_clusters, cluster_size)
    args = (int(qtype), table, cols, rows, x, scores, top_k, clusters)
    want, got = cpu.clustered_logits(*args), gpu.clustered_logits(*args)
    masked = want == want.min(axis=1, keepdims=True)
    np.testing.assert_array_equal(got == got.min(axis=1, keepdims=True), masked)
    assert relative_error(got[~masked], want[~masked]) < (1e-5 if qtype == T.F32 else 3e-2)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.F32], ids=lambda t: t.name)
def test_moe_routing_and_experts_match_cpu(backends, qtype):
    cpu, gpu = backends
    rng = np.random.default_rng(int(qtype))
    n, n_embd, n_ff, n_expert, k = 6, 256, 512, 16, 4
    logits = rng.standard_normal((n, n_expert)).astype(np.float32)
    gate_up = random_weights(rng, qtype, n_expert * 2 * n_ff, n_embd).reshape(-1)
    down = random_weights(rng, qtype, n_expert * n_embd, n_ff).reshape(-1)
    scale = rng.uniform(0.5, 2, n_expert).astype(np.float32)
    x = rng.standard_normal((n, n_embd)).astype(np.float32) * 1e-3  # keeps the products finite
    args = (logits, k, int(qtype), gate_up, int(qtype), down, n_ff, scale, x)
    want_ids, want_w, want = cpu.moe(*args)
    got_ids, got_w, got = gpu.moe(*args)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5)
    assert relative_error(got, want) < (1e-5 if qtype == T.F32 else 3e-2)


# --- whole models ---------------------------------------------------------------------------------

_engines: dict[tuple[str, str, str], Engine] = {}


def engine_for(fixtures_dir, model: str, qtype: str, backend: str) -> Engine:
    key = (model, qtype, backend)
    if key not in _engines:
        path = fixtures_dir / model / f"model-{qtype}.gguf"
        # f32 KV on both: the CUDA backend stores no other type.
        _engines[key] = Engine(path, backend=backend, threads=2, max_sequences=4, kv_dtype="f32")
    return _engines[key]


@pytest.mark.cuda
@needs_gpu
def test_f32_matches_huggingface_on_cuda(fixtures_dir, parity_report):
    engine = engine_for(fixtures_dir, "gemma4-tiny-e", "f32", "cuda")
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    worst = 0.0
    for i in range(N_PROMPTS):
        logits = engine.forward(ref[f"ids{i}"])
        worst = max(worst, float(np.abs(logits - ref[f"logits{i}"]).max()))
        np.testing.assert_array_equal(logits.argmax(-1), ref[f"logits{i}"].argmax(-1))
    parity_report("CUDA gemma4-tiny-e f32 vs Hugging Face", worst)
    assert worst <= 0.005


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize(
    ("model", "qtype"),
    [("gemma4-tiny-e", t) for t in E_TYPES] + [("gemma4-tiny-moe", t) for t in MOE_TYPES],
)
def test_cuda_matches_the_references_and_the_cpu(fixtures_dir, parity_report, model, qtype):
    gpu = engine_for(fixtures_dir, model, qtype, "cuda")
    cpu = engine_for(fixtures_dir, model, qtype, "cpu")
    ref = np.load(fixtures_dir / model / "ref.npz")
    llama = np.load(fixtures_dir / model / "llama_ref.npz")
    worst = 0.0
    for i in range(N_PROMPTS):
        ids = ref[f"ids{i}"]
        logits = gpu.forward(ids)
        worst = max(worst, float(np.abs(logits - cpu.forward(ids)).max()))
        np.testing.assert_array_equal(logits.argmax(-1), llama[f"{qtype}/logits{i}"].argmax(-1))
        greedy = gpu.generate(ids, N_GREEDY, stop_tokens=())
        assert greedy == llama[f"{qtype}/greedy{i}"].tolist(), f"greedy differs on prompt {i}"
        assert greedy == cpu.generate(ids, N_GREEDY, stop_tokens=())
    parity_report(f"CUDA {model} {qtype} vs CPU", worst)


@pytest.mark.cuda
@needs_gpu
def test_sampled_generation_reads_logits_and_matches_cpu(fixtures_dir):
    gpu = engine_for(fixtures_dir, "gemma4-tiny-e", "Q8_0", "cuda")
    cpu = engine_for(fixtures_dir, "gemma4-tiny-e", "Q8_0", "cpu")
    ids = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")["ids1"]
    params = SamplingParams(temperature=0.7, seed=11, logprobs=3)
    got = list(gpu.stream(ids, 16, params, stop_tokens=()))
    want = list(cpu.stream(ids, 16, params, stop_tokens=()))
    assert [c.token_id for c in got] == [c.token_id for c in want]
    np.testing.assert_allclose(
        [c.sampled.logprob for c in got], [c.sampled.logprob for c in want], atol=0.05
    )


@pytest.mark.cuda
@needs_gpu
def test_graph_replay_is_identical_to_eager(fixtures_dir, monkeypatch):
    path = fixtures_dir / "gemma4-tiny-e" / "model-Q4_K_M.gguf"
    ids = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")["ids1"]
    replayed = Engine(path, backend="cuda")
    monkeypatch.setenv("PYGEMMA4_CUDA_GRAPHS", "0")
    eager = Engine(path, backend="cuda")
    for engine in (replayed, eager):
        engine.forward(ids)  # the first step of each shape is captured, later ones replayed
    first, second = replayed.forward(ids), eager.forward(ids)
    assert same_bits(first, second)
    assert replayed.generate(ids, 20, stop_tokens=()) == eager.generate(ids, 20, stop_tokens=())


@pytest.mark.cuda
@needs_gpu
def test_batched_decode_is_identical_to_one_sequence_at_a_time(fixtures_dir):
    engine = engine_for(fixtures_dir, "gemma4-tiny-e", "Q4_K_M", "cuda")
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    prompts = [ref[f"ids{i}"] for i in range(N_PROMPTS)]

    def decode(group: list[np.ndarray]) -> np.ndarray:
        sequences = [engine.new_sequence() for _ in group]
        try:
            for seq, prompt in zip(sequences, group, strict=True):
                seq.append(prompt[:-1])
            return engine.decode(sequences, [int(p[-1]) for p in group])
        finally:
            for seq in sequences:
                seq.close()

    batched = decode(prompts)
    for i, prompt in enumerate(prompts):
        alone = decode([prompt])[0]
        assert same_bits(batched[i], alone)


@pytest.mark.cuda
@needs_gpu
def test_a_host_pool_is_refused_by_a_cuda_model(fixtures_dir):
    engine = engine_for(fixtures_dir, "gemma4-tiny-e", "Q4_K_M", "cuda")
    host_pool = KvLayout.for_model(engine.config, 64, 1, 16).new_pool(engine.config)
    with pytest.raises(ValueError, match="KV pool is in host memory"):
        batch = ForwardBatch(
            tokens=np.array([1], np.int32),
            positions=np.array([0], np.int32),
            seqs=np.array([0], np.int32),
            block_tables=np.zeros((1, 4), np.int32),
            ring_sets=np.array([0], np.int32),
            logit_rows=np.array([0], np.int32),
            argmax_rows=np.empty(0, np.int32),
            hidden_rows=np.empty(0, np.int32),
        )
        engine.runner.model.forward(host_pool, batch)


# --- serving --------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA_REASON, reason="this machine can run CUDA")
def test_serving_on_cuda_without_a_gpu_is_an_error_line(demo_model_file, tmp_path):
    done = run_serve(demo_model_file, "--backend", "cuda", cwd=tmp_path)
    assert done.returncode == 1
    assert "error: CUDA is unavailable: " in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.cuda
@needs_gpu
def test_serving_on_cuda_gives_the_engines_tokens(fixtures_dir, tmp_path):
    # The workers share a KV pool on the GPU, opened through its CUDA IPC handle.
    model = fixtures_dir / "gemma4-tiny-e" / "model-Q4_K_M.gguf"
    engine = engine_for(fixtures_dir, "gemma4-tiny-e", "Q4_K_M", "cuda")
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    with ServeProcess.running(model, tmp_path, "--backend", "cuda", "--max-batch", "4") as server:
        client = server.client()
        try:
            for i in range(N_PROMPTS):
                ids = ref[f"ids{i}"].tolist()
                expected = engine.generate(ids, 16, stop_tokens=())
                result = client.complete(ids, 16, ignore_eos=True, temperature=0)
                assert list(result.token_ids) == expected, f"prompt {i}"
        finally:
            client.close()


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("draft", ["assistant", "ordered", "ngram"])
def test_drafting_on_cuda_gives_the_cpu_greedy_tokens(fixtures_dir, draft, request):
    draft_dir = fixtures_dir / "gemma4-tiny-draft"
    target = draft_dir / "target-f32.gguf"
    if draft == "ordered":  # the assistant with its centroid head
        drafter = request.getfixturevalue("ordered_drafter")
    else:
        drafter = draft_dir / "assistant-f32.gguf" if draft == "assistant" else "ngram"
    ref = np.load(draft_dir / "ref_draft.npz")
    cpu = Engine(target, threads=2, kv_dtype="f32")  # the KV type of the CUDA backend
    for k in (1, 4, 8):
        gpu = Engine(target, backend="cuda", draft=drafter, draft_tokens=k)
        for i in range(3):
            ids = ref[f"p{i}/ids"]
            assert gpu.generate(ids, 40, stop_tokens=()) == cpu.generate(ids, 40, stop_tokens=())
        assert gpu.speculation is not None and gpu.speculation.proposed > 0
