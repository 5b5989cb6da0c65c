"""Projector (mmproj) files: the tiny multimodal fixture's llama.cpp conversion loads with the
shapes of its Hugging Face config; damaged, foreign and mismatched files are refused naming the
file (and the model, for a mismatch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import rewrite_gguf

from pygemma4.config import open_model
from pygemma4.errors import Gemma4Error, GGUFError, UnsupportedModelError
from pygemma4.mmproj import CLAMP_SUFFIXES, MmprojMismatchError, open_mmproj


@pytest.fixture(scope="module")
def mmproj_path(mm_dir: Path) -> Path:
    return mm_dir / "mmproj-f32.gguf"


@pytest.fixture(scope="module")
def model(mm_dir: Path):
    return open_model(mm_dir / "model-f32.gguf")


def test_the_fixture_loads_with_its_configs_shapes(mmproj_path, model):
    mm = open_mmproj(mmproj_path, model)
    v = mm.vision
    assert v is not None
    assert (v.n_embd, v.n_ff, v.n_layer, v.n_head, v.head_dim) == (64, 128, 2, 2, 32)
    assert (v.patch_size, v.n_pos, v.pooling, v.rope_base) == (16, 64, 3, 100.0)
    assert v.projection_dim == model.config.n_embd == 128
    assert v.clipped == () and not v.standardize
    a = mm.audio
    assert a is not None
    assert (a.n_embd, a.n_layer, a.n_head, a.n_mel, a.output_dim) == (64, 2, 2, 128, 96)
    assert a.projection_dim == 128
    assert "v.patch_embd.weight" in mm.tensor_names("v.")
    assert all(name.startswith("a.") for name in mm.tensor_names("a."))
    assert mm.tensor_names("mm.") == ["mm.a.input_projection.weight", "mm.input_projection.weight"]


def _vision_clamps(layer: int, linear: str, suffixes=CLAMP_SUFFIXES) -> dict[str, np.ndarray]:
    values = {"input_min": -3.0, "input_max": 3.0, "output_min": -2.0, "output_max": 2.0}
    return {
        f"v.blk.{layer}.{linear}.{s}": np.array([values[s]], dtype=np.float32) for s in suffixes
    }


def test_clamp_ranges_are_found_per_linear_layer(mmproj_path, tmp_path):
    extra = _vision_clamps(0, "attn_q") | _vision_clamps(1, "ffn_down")
    path = rewrite_gguf(mmproj_path, tmp_path / "clipped.gguf", {}, new_tensors=extra)
    v = open_mmproj(path).vision
    assert v is not None
    assert v.clipped == ("v.blk.0.attn_q.weight", "v.blk.1.ffn_down.weight")


def test_a_vision_only_file_has_no_audio(mmproj_path, tmp_path):
    from gguf import GGUFReader

    audio = tuple(
        t.name for t in GGUFReader(mmproj_path).tensors if t.name.startswith(("a.", "mm.a."))
    )
    path = rewrite_gguf(
        mmproj_path,
        tmp_path / "vision.gguf",
        {"clip.has_audio_encoder": False},
        drop_tensors=audio,
    )
    mm = open_mmproj(path)
    assert mm.audio is None and mm.vision is not None


def test_the_projection_must_produce_the_models_width(mmproj_path, fixtures_dir):
    other = open_model(fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf")
    with pytest.raises(MmprojMismatchError) as e:
        open_mmproj(mmproj_path, other)
    assert str(mmproj_path) in str(e.value) and str(other.gguf.path) in str(e.value)
    assert "128" in str(e.value) and "256" in str(e.value)


# (name, metadata overrides, tensors dropped, tensors added, error type, words in the message)
BAD_FILES = [
    (
        "projector type of another model",
        {"clip.vision.projector_type": "gemma3"},
        (),
        {},
        UnsupportedModelError,
        "projector_type is 'gemma3'",
    ),
    (
        "unified vision projector",
        {"clip.vision.projector_type": "gemma4uv"},
        (),
        {},
        UnsupportedModelError,
        "gemma4uv",
    ),
    (
        "audio projector type",
        {"clip.audio.projector_type": "whisper"},
        (),
        {},
        UnsupportedModelError,
        "'whisper'",
    ),
    (
        "no tower at all",
        {"clip.has_vision_encoder": False, "clip.has_audio_encoder": False},
        (),
        {},
        UnsupportedModelError,
        "neither a vision nor an audio",
    ),
    ("missing tensor", {}, ("v.blk.1.ln2.weight",), {}, UnsupportedModelError, "v.blk.1.ln2"),
    (
        "unexpected tensor",
        {},
        (),
        {"v.blk.0.extra.weight": np.ones(64, np.float32)},
        UnsupportedModelError,
        "unexpected tensor 'v.blk.0.extra.weight'",
    ),
    (
        "block count beyond the tensors",
        {"clip.vision.block_count": 3},
        (),
        {},
        UnsupportedModelError,
        "v.blk.2.",
    ),
    (
        "width that contradicts the tensors",
        {"clip.vision.embedding_length": 96},
        (),
        {},
        UnsupportedModelError,
        "v.position_embd.weight",
    ),
    (
        "heads that do not divide the width",
        {"clip.vision.attention.head_count": 3},
        (),
        {},
        UnsupportedModelError,
        "head_count 3",
    ),
    (
        "normalised images",
        {"clip.vision.image_mean": [0.5, 0.5, 0.5]},
        (),
        {},
        UnsupportedModelError,
        "image_mean",
    ),
    (
        "zero epsilon",
        {"clip.vision.attention.layer_norm_epsilon": 0.0},
        (),
        {},
        UnsupportedModelError,
        "layer_norm_epsilon",
    ),
    (
        "half a clamp range",
        {},
        (),
        _vision_clamps(0, "attn_k", ("input_min", "input_max")),
        UnsupportedModelError,
        "v.blk.0.attn_k.output_",
    ),
    (
        "a clamp range on a norm",
        {},
        (),
        {"v.blk.0.ln1." + s: np.ones(1, np.float32) for s in CLAMP_SUFFIXES},
        UnsupportedModelError,
        "not a linear layer",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "drop", "extra", "error", "words"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_files_are_refused_naming_the_file(
    mmproj_path, tmp_path, overrides, drop, extra, error, words
):
    path = rewrite_gguf(
        mmproj_path, tmp_path / "bad.gguf", overrides, drop_tensors=drop, new_tensors=extra
    )
    with pytest.raises(error) as e:
        open_mmproj(path)
    assert str(path) in str(e.value)
    assert words in str(e.value)


def test_a_text_model_is_not_a_projector(mm_dir):
    with pytest.raises(UnsupportedModelError, match="architecture is 'gemma4', not 'clip'"):
        open_mmproj(mm_dir / "model-f32.gguf")


@pytest.mark.parametrize("keep", [0, 100, 5000, -1000])
def test_damaged_files_are_refused(mmproj_path, tmp_path, keep):
    data = mmproj_path.read_bytes()
    path = tmp_path / "damaged.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(Gemma4Error) as e:
        open_mmproj(path)
    assert str(path) in str(e.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        open_mmproj(tmp_path / "absent.gguf")
