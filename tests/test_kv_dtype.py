"""KV entry types (f32, f16, bf16, q8_0): logits against Hugging Face's f32 reference within the
bound measured for each type, greedy output identical to llama.cpp's with the same KV type, the
pool's size what the bytes per entry predict, and bad types refused naming the accepted ones.

The bounds are the measured worst |logit difference| over the fixture's prompts with a margin
(README, "KV cache"): f32 4.1e-5, f16 0.0105, bf16 0.074, q8_0 0.264; llama.cpp on the same file
and KV type measures 0.012, 0.012, 0.107, 0.392.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from serve_helpers import ServeProcess, run_serve

from pygemma4 import Engine, open_model
from pygemma4.kv import KV_DTYPES, KvDtypeError, KvFootprint, KvLayout

HF_BOUNDS = {"f32": 0.005, "f16": 0.015, "bf16": 0.1, "q8_0": 0.35}
N_PROMPTS = 3
N_GREEDY = 24

_engines: dict[str, Engine] = {}


def engine_for(fixtures_dir: Path, kv_dtype: str) -> Engine:
    if kv_dtype not in _engines:
        path = fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf"
        _engines[kv_dtype] = Engine(path, threads=2, kv_dtype=kv_dtype)
    return _engines[kv_dtype]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_logits_match_huggingface_within_the_types_bound(fixtures_dir, parity_report, kv_dtype):
    engine = engine_for(fixtures_dir, kv_dtype)
    assert engine.kv_layout.kv_dtype == kv_dtype
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    worst = 0.0
    for i in range(N_PROMPTS):
        expected = ref[f"logits{i}"]
        logits = engine.forward(ref[f"ids{i}"])
        worst = max(worst, float(np.abs(logits - expected).max()))
        np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))
    assert worst <= HF_BOUNDS[kv_dtype], f"KV {kv_dtype}: max |dlogit| {worst} vs Hugging Face"
    parity_report(f"gemma4-tiny-e f32, KV {kv_dtype} vs Hugging Face", worst)


def llama_cpp_greedy(model: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    model.reset()
    model.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(token)
        model.eval([token])
    return out


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_greedy_output_equals_llama_cpps_with_the_same_kv_type(fixtures_dir, kv_dtype):
    engine = engine_for(fixtures_dir, kv_dtype)
    llama = llama_cpp.Llama(
        str(fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf"),
        n_ctx=512,
        logits_all=True,
        flash_attn=True,  # llama.cpp stores a quantized V only with flash attention
        n_threads=2,
        verbose=False,
        type_k=KV_DTYPES[kv_dtype],
        type_v=KV_DTYPES[kv_dtype],
    )
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    for i in range(N_PROMPTS):
        ids = ref[f"ids{i}"].tolist()
        ours = engine.generate(ids, N_GREEDY, stop_tokens=())
        assert ours == llama_cpp_greedy(llama, ids, N_GREEDY), f"prompt {i}, KV {kv_dtype}"


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_the_pool_is_the_size_the_bytes_per_entry_predict(fixtures_dir, kv_dtype):
    for model in ("gemma4-tiny-e", "gemma4-tiny-moe"):
        path = next((fixtures_dir / model).glob("model-*.gguf"))
        config = open_model(path).config
        layout = KvLayout.for_model(config, 256, 3, 64, kv_dtype=kv_dtype)
        footprint = KvFootprint.of(config, kv_dtype)
        stores = 2 * (footprint.full_layers + footprint.sliding_layers)
        predicted = footprint.predicted_bytes(layout)
        assert predicted <= layout.nbytes < predicted + 64 * stores  # alignment padding
        assert layout.new_pool(config).nbytes == layout.nbytes


def test_entry_sizes_scale_the_pool():
    config = open_model(_any_fixture()).config
    f32 = KvFootprint.of(config, "f32")
    assert KvFootprint.of(config, "f16").full_bytes_per_token * 2 == f32.full_bytes_per_token
    assert KvFootprint.of(config, "bf16").sliding_bytes_per_token * 2 == (
        f32.sliding_bytes_per_token
    )
    q8 = KvFootprint.of(config, "q8_0")
    assert q8.full_bytes_per_token * 4 * 32 == f32.full_bytes_per_token * 34


def _any_fixture() -> Path:
    from conftest import require_fixtures

    return require_fixtures() / "gemma4-tiny-e" / "model-Q8_0.gguf"


@pytest.mark.parametrize("bad", ["q4", "F16", "fp16", ""])
def test_unknown_kv_types_are_refused_naming_the_accepted_ones(fixtures_dir, bad):
    path = fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf"
    with pytest.raises(KvDtypeError, match=f"unknown KV type {bad!r}: expected one of f32, f16"):
        Engine(path, kv_dtype=bad)
    with pytest.raises(KvDtypeError, match="bf16, q8_0"):
        KvLayout.of(open_model(path).config, 16, 4, 1, 1, kv_dtype=bad)


def test_cuda_takes_f32_kv_only(fixtures_dir):
    path = fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf"
    for kv_dtype in ("f16", "bf16", "q8_0"):
        with pytest.raises(KvDtypeError, match=f"f32 only, not '{kv_dtype}'"):
            Engine(path, backend="cuda", kv_dtype=kv_dtype)


def test_the_core_refuses_a_cuda_pool_of_another_type(fixtures_dir):
    config = open_model(fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf").config
    layout = KvLayout.of(config, 16, 4, 1, 1, kv_dtype="f16")
    with pytest.raises(ValueError, match="stores F32 entries, not F16|CUDA"):
        layout.new_pool(config, device=0)


def test_the_default_is_f16_on_the_cpu(fixtures_dir):
    engine = Engine(fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf", threads=1)
    assert engine.kv_layout.kv_dtype == "f16"
    assert engine.runner.pool.kv_type == KV_DTYPES["f16"]


def test_generate_refuses_a_bad_kv_type(fixtures_dir, tmp_path):
    path = fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf"
    result = subprocess.run(
        [sys.executable, "-m", "pygemma4", "generate", str(path), "Hi", "--kv-dtype", "q4"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYGEMMA4_CACHE": str(tmp_path)},
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "unknown KV type 'q4': expected one of f32, f16, bf16, q8_0" in result.stderr


def test_the_cli_generates_with_each_kv_type(fixtures_dir, tmp_path):
    path = fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf"
    for kv_dtype in KV_DTYPES:
        result = subprocess.run(
            [sys.executable, "-m", "pygemma4", "generate", str(path), "Hello"]
            + ["--max-tokens", "4", "--threads", "1", "--kv-dtype", kv_dtype],
            capture_output=True,
            text=True,
            env={**os.environ, "PYGEMMA4_CACHE": str(tmp_path)},
            cwd=tmp_path,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_serve_sizes_its_pool_by_the_kv_type_and_prints_the_prediction(
    demo_model_file: Path, tmp_path: Path
):
    blocks = {}
    for kv_dtype in ("f32", "q8_0"):
        with (
            ServeProcess.running(
                demo_model_file,
                tmp_path,
                "--threads",
                "1",
                "--kv-memory",
                "16MiB",
                "--kv-dtype",
                kv_dtype,
            ) as server,
            server.client() as client,
        ):
            blocks[kv_dtype] = client.health().kv_blocks_total
            result = client.complete("Hello", 8, temperature=0, ignore_eos=True)
            engine = Engine(demo_model_file, threads=1, kv_dtype=kv_dtype)
            want = engine.generate(engine.tokenizer.encode("Hello"), 8, stop_tokens=())
            assert list(result.token_ids) == want
            output = server.output()
            assert f"KV entries {kv_dtype}: " in output
            assert "full-attention layers" in output and "sliding-window layers" in output
            assert "predicted" in output
    assert blocks["q8_0"] > 3.5 * blocks["f32"]
    result = run_serve(demo_model_file, "--kv-dtype", "q4", cwd=tmp_path)
    assert result.returncode == 1
    assert "unknown KV type 'q4': expected one of f32, f16, bf16, q8_0" in result.stderr
