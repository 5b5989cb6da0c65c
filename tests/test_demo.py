"""The demo model: generated deterministically and safely, valid, and shaped as documented."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from pygemma4.config import open_model
from pygemma4.models.demo import DEMO_FILE_NAME, demo_model_path
from pygemma4.models.shapes import MODEL_SHAPES

F32, F16, Q8_0 = GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_bytes_in_every_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_model_file: Path
) -> None:
    monkeypatch.setenv("PYGEMMA4_CACHE", str(tmp_path / "other"))
    again = demo_model_path()
    assert again == tmp_path / "other" / DEMO_FILE_NAME
    assert again != demo_model_file
    assert sha256(again) == sha256(demo_model_file)


def test_cached_file_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGEMMA4_CACHE", str(tmp_path))
    first = demo_model_path()
    stamp = first.stat().st_mtime_ns
    assert demo_model_path() == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_FILE_NAME]


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYGEMMA4_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo_model_path() == tmp_path / ".cache" / "pygemma4" / DEMO_FILE_NAME


def test_concurrent_generation(tmp_path: Path, demo_model_file: Path) -> None:
    script = "from pygemma4.models.demo import demo_model_path; print(demo_model_path())"
    env = {**os.environ, "PYGEMMA4_CACHE": str(tmp_path)}
    repo_root = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            cwd=repo_root,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert outputs == {str(tmp_path / DEMO_FILE_NAME)}
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_FILE_NAME]
    assert sha256(tmp_path / DEMO_FILE_NAME) == sha256(demo_model_file)


def test_passes_validation_with_the_documented_shape(demo_model_file: Path) -> None:
    assert demo_model_file.stat().st_size < 5_000_000
    model = open_model(demo_model_file)
    config = model.config
    assert (config.n_layer, config.n_embd, config.n_embd_per_layer) == (8, 256, 16)
    assert (config.sliding_window, config.final_logit_softcap) == (16, 30.0)
    assert not config.has_output and config.n_expert == 0
    assert [layer.is_sliding for layer in config.layers] == [True] * 5 + [False, True, False]
    assert [layer.head_dim for layer in config.layers] == [32] * 5 + [64, 32, 64]
    assert {(layer.n_head, layer.n_head_kv) for layer in config.layers} == {(4, 2)}
    assert [layer.has_kv for layer in config.layers] == [True] * 6 + [False] * 2
    assert [layer.kv_source for layer in config.layers] == [0, 1, 2, 3, 4, 5, 4, 5]
    assert [layer.n_ff for layer in config.layers] == [256] * 6 + [512] * 2
    assert model.gguf.metadata["general.name"] == "pygemma4-demo"
    types = {t.type_id for t in model.gguf.tensors.values()}
    assert types == {F32, F16, Q8_0}
    for info in model.gguf.tensors.values():
        assert (info.type_id == F32) == (len(info.shape) == 1), info.name
    # The table of model shapes describes this file.
    assert config == MODEL_SHAPES["demo"].model_config()


def test_proportional_rope_factors(demo_model_file: Path) -> None:
    (rope,) = [t for t in GGUFReader(demo_model_file).tensors if t.name == "rope_freqs.weight"]
    factors = np.asarray(rope.data)
    assert factors.shape == (32,)
    np.testing.assert_array_equal(factors[:8], 1.0)
    np.testing.assert_array_equal(factors[8:], np.float32(1e30))


def test_tokenizer_metadata(demo_model_file: Path) -> None:
    model = open_model(demo_model_file)
    meta = model.gguf.metadata
    tokens = meta["tokenizer.ggml.tokens"]
    token_type = meta["tokenizer.ggml.token_type"]
    assert isinstance(tokens, list) and isinstance(token_type, list)
    assert len(tokens) == model.config.vocab_size == len(set(tokens))
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
    assert tokens[:7] == specials
    assert tokens[7:263] == [f"<0x{b:02X}>" for b in range(256)]
    assert token_type[:7] == [3] * 7 and token_type[7:263] == [6] * 256
    assert set(token_type[263:]) == {1}
    assert {chr(c) for c in range(0x21, 0x7F)} | {"\u2581"} <= set(tokens)
    assert len(meta["tokenizer.ggml.scores"]) == len(tokens)  # type: ignore[arg-type]
    merges = meta["tokenizer.ggml.merges"]
    assert isinstance(merges, list) and 200 <= len(merges) <= 500
    vocab = set(tokens)
    for merge in merges:
        left, right = merge.split(" ")
        assert {left, right, left + right} <= vocab, merge
    assert "\u2581the\u2581" in vocab
    assert meta["tokenizer.ggml.model"] == "gemma4"
    ids = {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 2, "eos": 1, "unknown": 3, "padding": 0}
    assert meta["tokenizer.ggml.add_bos_token"] is True


def test_chat_template(demo_model_file: Path) -> None:
    template = open_model(demo_model_file).gguf.metadata["tokenizer.chat_template"]
    assert isinstance(template, str)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = jinja2.Template(template).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=True
    )
    assert rendered == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello.<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n"
    )
    without_prompt = jinja2.Template(template).render(
        messages=messages[1:2], bos_token="<bos>", add_generation_prompt=False
    )
    assert without_prompt == "<bos><|turn>user\nHi<turn|>\n"
