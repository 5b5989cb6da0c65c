"""The synthetic full-size models: the real architectures, llama.cpp's Q4_K_M type mix, random
weights that run to finite logits, and a cache that never serves a half-written file."""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from pygemma4.config import open_model
from pygemma4.engine import Engine
from pygemma4.gguf_file import read_gguf
from pygemma4.models import synthetic
from pygemma4.models.shapes import model_shape
from pygemma4.models.synthetic import (
    SYNTHETIC_MODELS,
    main,
    q4_k_m_tensor_types,
    synthetic_model_path,
    synthetic_model_summary,
    synthetic_tensors,
    write_synthetic_model,
)

# Small members of each family: few layers, narrow, a small vocabulary; head sizes, head
# counts, layer pattern, KV sharing, K = V and the expert MLP's row lengths stay as they are.
SMALL: dict[str, dict[str, object]] = {
    "e2b": dict(n_layer=7, n_embd=256, n_ff=512, vocab_size=512),
    "e4b": dict(n_layer=8, n_embd=256, n_ff=512, vocab_size=512),
    "26b-a4b": dict(n_layer=2, n_embd=256, n_expert=4, n_expert_used=2, vocab_size=512),
    "31b": dict(n_layer=2, n_embd=256, n_ff=512, vocab_size=512),
}
TINY: dict[str, object] = dict(n_layer=2, n_embd=256, n_ff=256, vocab_size=400)
V = 262_144


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_types(path: Path) -> dict[str, T]:
    return {name: T(t.type_id) for name, t in read_gguf(path).tensors.items()}


# -- the type mix --------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["gemma4-tiny-e", "gemma4-tiny-moe"])
def test_type_mix_is_that_of_the_fixtures_q4_k_m_files(fixtures_dir: Path, folder: str) -> None:
    """The rule, applied to a fixture's own shapes, gives the types llama.cpp's quantizer gave
    its Q4_K_M file (quantized from an F32 conversion)."""
    gguf = read_gguf(fixtures_dir / folder / "model-Q4_K_M.gguf")
    shapes = {name: t.shape for name, t in gguf.tensors.items()}
    predicted = q4_k_m_tensor_types(
        shapes,
        n_layer=gguf.metadata["gemma4.block_count"],
        n_expert=gguf.metadata.get("gemma4.expert_count", 0),
        float_type=T.F32,
    )
    actual = {name: T(t.type_id) for name, t in gguf.tensors.items()}
    assert predicted == actual
    # Not a trivial mix: Q6_K on the "more bits" layers, block-size fallbacks.
    assert {T.Q4_K, T.Q6_K, T.F32} <= set(actual.values())
    if folder == "gemma4-tiny-e":
        assert {T.Q5_0, T.Q8_0, T.F16} <= set(actual.values())


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        # per_layer_token_embd rows a multiple of 256 (Q6_K; the fixture's fall back to Q8_0)
        ("e4b", dict(n_layer=9, n_embd=256, n_ff=512, vocab_size=512)),
        # exactly 8 experts: llama.cpp's special case (attn_k/attn_v Q8_0, attn_output Q5_K)
        (
            "26b-a4b",
            dict(n_layer=3, n_embd=256, n_ff=512, n_expert=8, n_expert_used=2, vocab_size=512),
        ),
    ],
)
def test_type_mix_is_that_of_llama_cpps_quantizer(
    tmp_path: Path, name: str, overrides: dict[str, object]
) -> None:
    """A synthetic model written in F32 and quantized by llama.cpp itself gets the types the
    rule predicts for it."""
    llama_cpp = pytest.importorskip("llama_cpp")
    source = write_synthetic_model(name, tmp_path / "f32.gguf", mix="F32", **overrides)
    assert set(file_types(source).values()) == {T.F32}
    out = tmp_path / "q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(
        str(source).encode(), str(out).encode(), ctypes.byref(params)
    )
    assert rc == 0
    model = model_shape(name, **overrides)
    predicted = {s.name: s.type for s in synthetic_tensors(model, "Q4_K_M", float_type=T.F32)}
    actual = file_types(out)
    assert predicted == actual
    assert T.Q6_K in actual.values()


def test_type_mix_of_the_full_size_models() -> None:
    types = {name: {s.name: s.type for s in synthetic_tensors(name)} for name in SYNTHETIC_MODELS}
    e4b = types["e4b"]
    assert e4b["token_embd.weight"] == e4b["per_layer_token_embd.weight"] == T.Q6_K
    assert e4b["per_layer_model_proj.weight"] == T.BF16  # not quantized: as converted
    # 24 attn_v tensors (layers 0-23; 24-41 share KV): Q6_K for 0-2, 21-23 and every third.
    assert [il for il in range(24) if e4b[f"blk.{il}.attn_v.weight"] == T.Q6_K] == [
        0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23
    ]  # fmt: skip
    # 42 ffn_down: Q6_K for layers 0-4, 36-41 and every third between.
    assert [il for il in range(42) if e4b[f"blk.{il}.ffn_down.weight"] == T.Q6_K] == [
        0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 36, 37, 38, 39, 40, 41
    ]  # fmt: skip
    moe = types["26b-a4b"]
    assert moe["blk.0.ffn_gate_inp.weight"] == T.F32
    assert moe["blk.0.ffn_gate_up_exps.weight"] == T.Q4_K
    # rows of 2112 and 704 are no multiple of 256: Q4_K falls back to Q5_0, Q6_K to Q8_0
    # (layer 3 of 30 gets Q4_K, layer 5 Q6_K: use_more_bits(5, 30))
    assert (moe["blk.3.ffn_down.weight"], moe["blk.3.ffn_down_exps.weight"]) == (T.Q5_0,) * 2
    assert (moe["blk.5.ffn_down.weight"], moe["blk.5.ffn_down_exps.weight"]) == (T.Q8_0,) * 2
    for mix in types.values():
        assert set(mix.values()) <= {T.F32, T.BF16, T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0}


# -- the architectures ---------------------------------------------------------------------------

# From the Hugging Face configs (transformers' convert_gemma4_weights.py variants with the
# Gemma4TextConfig defaults): layers, width, heads, KV heads sliding / full, MLP, every how many
# layers a full-attention one, sliding window, PLE width, KV-sharing layers, K = V (no V
# projection in full layers), experts / used / expert width, context.
HF_CONFIGS: dict[str, tuple[Any, ...]] = {
    "e2b":     (35, 1536,  8, (1, 1),   6144, 5,  512, 256, 20, False, (0, 0, 0),     131072),
    "e4b":     (42, 2560,  8, (2, 2),  10240, 6,  512, 256, 18, False, (0, 0, 0),     131072),
    "26b-a4b": (30, 2816, 16, (8, 2),   2112, 6, 1024,   0,  0, True,  (128, 8, 704), 262144),
    "31b":     (60, 5376, 32, (16, 4), 21504, 6, 1024,   0,  0, True,  (0, 0, 0),     262144),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_architecture_is_the_hugging_face_config(name: str) -> None:
    layers, width, heads, kv, n_ff, period, window, ple, shared, k_eq_v, experts, context = (
        HF_CONFIGS[name]
    )
    m = SYNTHETIC_MODELS[name]
    assert (m.n_layer, m.n_embd, m.n_head) == (layers, width, heads)
    assert (m.n_head_kv_swa, m.n_head_kv_full) == kv
    assert (m.head_dim_swa, m.head_dim_full, m.vocab_size) == (256, 512, 262144)
    assert (m.n_ff, m.sliding_window, m.context_length) == (n_ff, window, context)
    assert (m.n_embd_per_layer, m.n_shared_kv, m.full_has_v) == (ple, shared, not k_eq_v)
    assert (m.n_expert, m.n_expert_used, m.n_ff_expert) == experts
    assert (m.final_logit_softcap, m.rms_eps) == (30.0, 1e-6)
    assert (m.rope_base_swa, m.rope_base_full, m.partial_rotary_full) == (1e4, 1e6, 0.25)
    full = [il for il, sliding in enumerate(m.sliding) if not sliding]
    assert full == list(range(period - 1, m.n_layer, period))
    assert full[-1] == m.n_layer - 1


def test_e2b_mlp_is_double_width_in_the_kv_sharing_layers() -> None:
    assert SYNTHETIC_MODELS["e2b"].n_ff_per_layer == (6144,) * 15 + (12288,) * 20
    assert SYNTHETIC_MODELS["e4b"].n_ff_per_layer == (10240,) * 42


def sparse_files_supported(directory: Path) -> bool:
    probe = directory / "sparse-probe"
    with open(probe, "wb") as f:
        f.truncate(1 << 30)
    supported = probe.stat().st_blocks * 512 < 1 << 20
    probe.unlink()
    return supported


@pytest.mark.parametrize("name", list(SYNTHETIC_MODELS))
def test_full_size_file_passes_validation_with_the_real_shapes(tmp_path: Path, name: str) -> None:
    """The whole model at full size, its data a hole (a sparse file): the engine's loader
    accepts every name, shape and metadata value, and derives the real architecture."""
    if not sparse_files_supported(tmp_path):
        pytest.skip("the temporary directory's file system has no sparse files")
    path = write_synthetic_model(name, tmp_path / f"{name}.gguf", layout_only=True)
    assert path.stat().st_blocks * 512 < 64 << 20  # nothing but metadata was written
    model = SYNTHETIC_MODELS[name]
    loaded = open_model(path)
    config = loaded.config
    # The configuration the tensor shapes were derived from is the one the loader derives.
    assert config == model.model_config()
    assert (config.n_layer, config.n_embd, config.vocab_size) == (model.n_layer, model.n_embd, V)
    assert config.n_ctx_train == model.context_length
    assert (config.sliding_window, config.final_logit_softcap) == (model.sliding_window, 30.0)
    assert config.n_embd_per_layer == model.n_embd_per_layer
    assert (config.n_expert, config.n_expert_used) == (model.n_expert, model.n_expert_used)
    assert config.n_ff_expert == model.n_ff_expert and not config.has_output
    for layer in config.layers:
        il = layer.index
        assert layer.is_sliding == model.sliding[il]
        assert layer.head_dim == (256 if layer.is_sliding else 512)
        assert layer.n_rot == layer.head_dim
        assert layer.n_head_kv == (
            model.n_head_kv_swa if layer.is_sliding else model.n_head_kv_full
        )
        assert layer.n_ff == model.n_ff_per_layer[il]
        assert layer.has_kv == (il < model.n_layer - model.n_shared_kv)
        assert layer.has_v_proj == (layer.has_kv and (layer.is_sliding or model.full_has_v))
        assert layer.is_moe == (model.n_expert > 0)
    specs = synthetic_tensors(name)
    assert list(loaded.gguf.tensors) == [s.name for s in specs]  # llama.cpp's order
    assert {n: T(t.type_id) for n, t in loaded.gguf.tensors.items()} == {
        s.name: s.type for s in specs
    }
    tensor_bytes = sum(t.nbytes for t in loaded.gguf.tensors.values())
    assert tensor_bytes == synthetic_model_summary(name)["tensor_bytes"]


def test_smaller_variants_keep_valid_kv_sharing() -> None:
    assert model_shape("e4b", n_layer=8).n_shared_kv == 2  # layers 6 (sliding), 7 (full)
    assert model_shape("e2b", n_layer=7).n_shared_kv == 2
    assert model_shape("e4b", n_layer=3).n_shared_kv == 0  # no earlier full layer to share
    with pytest.raises(ValueError, match="without an earlier layer"):
        model_shape("e4b", n_layer=8, n_shared_kv=3)
    with pytest.raises(ValueError, match="unknown model"):
        model_shape("7b")
    with pytest.raises(ValueError, match="unknown ModelShape field"):
        model_shape("e4b", layers=4)
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        model_shape("e4b", vocab_size=100)


# -- the weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL))
def test_small_variant_runs_to_finite_logits(tmp_path: Path, name: str) -> None:
    path = write_synthetic_model(name, tmp_path / f"{name}.gguf", **SMALL[name])
    engine = Engine(path, threads=1, n_ctx=32)
    logits = engine.forward([2, 300, 400, 511, 7])
    assert logits.shape == (5, 512)
    assert np.isfinite(logits).all()
    assert logits.std() > 0.1 and np.abs(logits).max() <= 30.0  # the softcap
    tokens = engine.generate([2, 300, 400], 4, stop_tokens=())
    assert len(tokens) == 4 and all(0 <= t < 512 for t in tokens)
    tokenizer = engine.tokenizer
    ids = tokenizer.encode("hello world")
    assert ids[0] == 2 and tokenizer.decode(ids) == "hello world"


def test_random_blocks_are_valid(tmp_path: Path) -> None:
    """Every block's fp16 scales are small positive normal numbers; every tensor dequantizes
    to finite values of a moderate size; norms are near 1."""
    path = write_synthetic_model("e2b", tmp_path / "e2b.gguf", **SMALL["e2b"])
    seen = set()
    for tensor in GGUFReader(path).tensors:
        kind = T(tensor.tensor_type)
        seen.add(kind)
        data = np.asarray(tensor.data)
        if kind in (T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0):
            block_bytes = GGML_QUANT_SIZES[kind][1]
            blocks = data.reshape(-1, block_bytes)
            offsets = {T.Q4_K: (0, 2), T.Q6_K: (208,), T.Q5_0: (0,), T.Q8_0: (0,)}[kind]
            for at in offsets:
                scale = blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)
                assert np.all(scale >= 2.0**-14) and np.all(scale < 0.01), tensor.name
            values = dequantize(data.reshape(-1), kind)
        elif kind == T.BF16:
            values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.asarray(data, dtype=np.float32).reshape(-1)
        assert np.isfinite(values).all(), tensor.name
        if tensor.name.endswith("_norm.weight"):
            assert 0.5 < values.mean() < 1.5, tensor.name
        elif len(tensor.shape) >= 2:
            assert 0 < values.std() < 0.2, tensor.name
    assert {T.Q4_K, T.Q6_K, T.BF16, T.F32} <= seen


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_synthetic_model("31b", tmp_path / "a.gguf", **TINY)
    b = write_synthetic_model("31b", tmp_path / "b.gguf", **TINY)
    c = write_synthetic_model("31b", tmp_path / "c.gguf", seed=1, **TINY)
    assert sha256(a) == sha256(b) != sha256(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]


# -- the cache -----------------------------------------------------------------------------------


def test_cached_file_is_written_once(tmp_path: Path) -> None:
    first = synthetic_model_path("e4b", tmp_path, **TINY)
    assert first.parent == tmp_path and first.name.startswith("gemma4-e4b-synthetic-Q4_K_M-")
    stamp = first.stat().st_mtime_ns
    assert synthetic_model_path("e4b", tmp_path, **TINY) == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    open_model(first)
    # Another seed or another shape is another file.
    assert synthetic_model_path("e4b", tmp_path, seed=1, **TINY) != first
    assert synthetic_model_path("e4b", tmp_path, **{**TINY, "n_layer": 3}) != first


def test_leftover_temporary_file_is_not_taken_for_the_model(tmp_path: Path) -> None:
    name = synthetic.cache_file_name("e2b", **TINY)
    leftover = tmp_path / f".{name}-dead.tmp"
    leftover.write_bytes(b"GGUF half a file")
    path = synthetic_model_path("e2b", tmp_path, **TINY)
    assert path == tmp_path / name != leftover
    open_model(path)
    assert leftover.read_bytes() == b"GGUF half a file"  # someone else's; left alone


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(path: Path, *args: object) -> None:
        path.write_bytes(b"GGUF partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "_write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            synthetic_model_path("e2b", tmp_path, **TINY)
        with pytest.raises(KeyboardInterrupt):
            write_synthetic_model("e2b", tmp_path / "direct.gguf", **TINY)
    assert list(tmp_path.iterdir()) == []
    open_model(synthetic_model_path("e2b", tmp_path, **TINY))


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGEMMA4_CACHE", str(tmp_path / "cache"))
    assert synthetic_model_path("e2b", **TINY).parent == tmp_path / "cache" / "synthetic"
    monkeypatch.delenv("PYGEMMA4_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = synthetic_model_path("e2b", **TINY)
    assert path.parent == tmp_path / "home" / ".cache" / "pygemma4" / "synthetic"


# -- summary and command line --------------------------------------------------------------------


def test_summary_counts_what_a_decode_step_reads() -> None:
    e4b = synthetic_model_summary("e4b")
    specs = {s.name: s for s in synthetic_tensors("e4b")}
    assert e4b["parameters"] == sum(s.n_elements for s in specs.values())
    vectors = sum(s.nbytes for s in specs.values() if len(s.shape) == 1)
    gathered = specs["per_layer_token_embd.weight"].nbytes
    assert e4b["decode_bytes"] == e4b["tensor_bytes"] - gathered - vectors
    assert 7.4e9 < e4b["parameters"] < 7.5e9  # the text model of "E4B, 8B with embeddings"
    assert 4.6e9 < e4b["decode_parameters"] < 4.7e9  # its effective 4.5B, plus the LM head
    assert 4.6e9 < synthetic_model_summary("e2b")["parameters"] < 4.7e9
    assert 30.6e9 < synthetic_model_summary("31b")["parameters"] < 30.8e9
    moe = synthetic_model_summary("26b-a4b")
    assert 25.1e9 < moe["parameters"] < 25.3e9
    assert 3.7e9 < moe["decode_parameters"] < 3.9e9  # "A4B": 3.8B active
    specs = synthetic_tensors("26b-a4b")
    vectors = sum(s.nbytes for s in specs if len(s.shape) == 1)
    experts = sum(s.nbytes for s in specs if len(s.shape) == 3)
    unused = experts * (128 - 8) / 128
    assert moe["decode_bytes"] == round(moe["tensor_bytes"] - vectors - unused)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.gguf"
    main(["e2b", str(out), "--n-layer", "2", "--vocab-size", "400", "--seed", "3"])
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{out.stat().st_size} bytes" in printed
    assert open_model(out).config.n_layer == 2
    main(["31b", "--summary"])
    printed = capsys.readouterr().out
    assert "parameters: 30" in printed and "decode_bytes:" in printed
