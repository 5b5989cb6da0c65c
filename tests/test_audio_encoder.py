"""The audio input of an mmproj GGUF: the Conformer's embeddings equal transformers' (the
fixture's stored outputs, and the audio tower run live on clips made here), the unified models'
raw-frame embeddings the unified fixture's, one soft token per 40 ms; files without a Gemma 4
audio input and unusable features are refused with clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import audio_scales_of, rewrite_gguf
from safetensors.numpy import load_file

from pygemma4.errors import GGUFError, UnsupportedModelError
from pygemma4.media.audio import SAMPLE_RATE, AudioError, decode_wav, prepare_samples
from pygemma4.media.audio_encoder import AudioEncoder, AudioEncoderError, embed_audio

EMBEDDING_ATOL = 1e-3


@pytest.fixture(scope="module")
def ref(mm_dir: Path):
    return np.load(mm_dir / "ref_mm.npz")


@pytest.fixture(scope="module")
def encoder(mm_dir: Path) -> AudioEncoder:
    return AudioEncoder(mm_dir / "mmproj-f32.gguf", threads=2)


@pytest.mark.parametrize("k", [0, 1])
def test_stored_features_give_the_stored_embeddings(encoder, ref, k):
    embeddings = encoder.encode_features(ref[f"aud{k}/input_features"])
    expected = ref[f"aud{k}/embeddings"]
    assert embeddings.shape == expected.shape == (int(ref[f"aud{k}/num_soft_tokens"]), 128)
    assert np.abs(embeddings - expected).max() <= EMBEDDING_ATOL


@pytest.mark.parametrize("k", [0, 1])
def test_wav_files_give_the_stored_embeddings(encoder, mm_dir, ref, k):
    samples = decode_wav(mm_dir / "inputs" / f"aud{k}.wav")
    expected = ref[f"aud{k}/embeddings"]
    assert np.abs(embed_audio(encoder, samples, SAMPLE_RATE) - expected).max() <= EMBEDDING_ATOL
    # From the file's path as well: the encoder loaded for the call.
    from_path = embed_audio(mm_dir / "mmproj-f32.gguf", samples)
    assert np.abs(from_path - expected).max() <= EMBEDDING_ATOL


def clip(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * (300 + 400 * np.sin(3 * t)) * t)
    mono = tone + 0.1 * rng.standard_normal(t.size)
    return np.stack([mono, 0.5 * mono], axis=1) if channels > 1 else mono


@pytest.fixture(scope="module")
def live_tower(mm_dir):
    """transformers' audio tower and embedder of the fixture's checkpoint, run on the CPU."""
    torch = pytest.importorskip("torch", reason="torch (CPU) runs transformers live")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        mm_dir / "hf", dtype=torch.float32
    ).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(mm_dir / "hf")

    def embed(samples: np.ndarray) -> np.ndarray:
        inputs = extractor([samples], return_tensors="pt")
        with torch.no_grad():
            out = model.model.get_audio_features(
                inputs["input_features"], inputs["input_features_mask"]
            )
        return out.pooler_output[0][out.attention_mask[0]].numpy()

    return embed


@pytest.mark.parametrize(
    ("seconds", "rate", "channels"),
    [(0.05, 16_000, 1), (0.37, 44_100, 2), (3.7, 22_050, 1), (7.9, 48_000, 2)],
)
def test_embeddings_equal_the_audio_tower_run_live(encoder, live_tower, seconds, rate, channels):
    samples = prepare_samples(clip(seconds, rate, channels, seed=rate), rate)
    expected = live_tower(samples)
    embeddings = encoder.embed(samples, SAMPLE_RATE)
    assert embeddings.shape == expected.shape
    assert np.abs(embeddings - expected).max() <= EMBEDDING_ATOL
    # About one soft token per 40 ms: four log-mel frames of 10 ms each.
    assert len(embeddings) == encoder.n_tokens(samples.size)


def test_the_files_query_scales_are_the_checkpoints_rounded_to_float16(mm_dir):
    """llama.cpp's converter stores each audio layer's softplus(per_dim_scale) computed in the
    checkpoint's float16: up to 4e-4 relative off transformers' float32 softplus, the one audio
    weight the conversion changes (`hf_mm_model` takes the file's values back)."""
    checkpoint = load_file(mm_dir / "hf" / "model.safetensors")
    scales = audio_scales_of(mm_dir / "mmproj-f32.gguf")
    assert len(scales) == 2
    for layer, scale in enumerate(scales):
        raw = checkpoint[f"model.audio_tower.layers.{layer}.self_attn.per_dim_scale"]
        exact = np.logaddexp(0.0, raw.astype(np.float64))
        np.testing.assert_array_equal(scale, exact.astype(np.float16).astype(np.float64))
        assert np.abs(scale / exact - 1).max() > 1e-5


@pytest.mark.parametrize("k", [0, 1])
def test_embeddings_equal_transformers_on_the_files_weights(encoder, mm_dir, hf_mm_model, k):
    """With the very weights the mmproj holds, transformers' float32 tower and the engine's
    agree to float32 rounding, 1000 times closer than EMBEDDING_ATOL."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    samples = decode_wav(mm_dir / "inputs" / f"aud{k}.wav")
    inputs = transformers.AutoFeatureExtractor.from_pretrained(mm_dir / "hf")(
        [samples], return_tensors="pt"
    )
    with torch.no_grad():
        out = hf_mm_model.model.get_audio_features(
            inputs["input_features"], inputs["input_features_mask"]
        )
    expected = out.pooler_output[0][out.attention_mask[0]].numpy()
    assert np.abs(encoder.embed(samples, SAMPLE_RATE) - expected).max() < 1e-5


@pytest.fixture(scope="module")
def unified_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "gemma4-tiny-unified"


@pytest.fixture(scope="module")
def unified(unified_dir: Path) -> AudioEncoder:
    return AudioEncoder(unified_dir / "mmproj-f32.gguf", threads=2)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_unified_raw_frames_give_the_stored_embeddings(unified, unified_dir, k):
    ref = np.load(unified_dir / "ref_unified.npz")
    samples = decode_wav(unified_dir / "inputs" / f"aud{k}.wav")
    features = unified.features(samples)
    np.testing.assert_array_equal(features, ref[f"aud{k}/input_features"])
    embeddings = unified.embed(samples, SAMPLE_RATE)
    assert embeddings.shape == ref[f"aud{k}/embeddings"].shape
    assert np.abs(embeddings - ref[f"aud{k}/embeddings"]).max() <= EMBEDDING_ATOL
    assert unified.n_tokens(samples.size) == int(ref[f"aud{k}/num_soft_tokens"])


@pytest.mark.parametrize("n", [161, 300, 5900, 9600, 16_000, 77_777, 480_000])
def test_n_tokens_counts_the_rows_embed_makes(encoder, unified, n):
    samples = (0.1 * np.random.default_rng(n).standard_normal(n)).astype(np.float32)
    assert encoder.n_tokens(n) == len(encoder.features(samples)) // 4 + (
        len(encoder.features(samples)) % 4 > 0
    )
    assert unified.n_tokens(n) == len(unified.embed(samples, SAMPLE_RATE)) == -(-n // 640)
    if n <= 16_000:
        assert encoder.n_tokens(n) == len(encoder.embed(samples, SAMPLE_RATE))


def test_bad_features_are_refused(encoder):
    good = np.zeros((8, 128), np.float32)
    cases = {
        "1-D": (np.zeros(128, np.float32), "2-D"),
        "wrong width": (np.zeros((8, 80), np.float32), r"\[rows >= 1, 128\]"),
        "no frames": (np.zeros((0, 128), np.float32), r"\[rows >= 1, 128\]"),
        "nan": (np.where(np.arange(good.size).reshape(good.shape) == 7, np.nan, good), "NaN"),
        "a list": ([[0.0] * 128], "numpy array"),
    }
    for features, message in cases.values():
        with pytest.raises(AudioEncoderError, match=message):
            encoder.encode_features(features)


def test_bad_samples_are_refused_through_embed(encoder):
    with pytest.raises(AudioError, match="silent"):
        encoder.embed(np.zeros(4000, np.float32), SAMPLE_RATE)


def test_files_without_a_gemma4_audio_encoder_are_refused(fixtures_dir, tmp_path):
    mmproj = fixtures_dir / "gemma4-tiny-mm" / "mmproj-f32.gguf"
    other = rewrite_gguf(
        mmproj, tmp_path / "whisper.gguf", {"clip.audio.projector_type": "whisper"}
    )
    with pytest.raises(UnsupportedModelError, match="'whisper' is not one of") as info:
        AudioEncoder(other)
    assert str(other) in str(info.value)
    bins = rewrite_gguf(mmproj, tmp_path / "bins.gguf", {"clip.audio.num_mel_bins": 80})
    with pytest.raises(UnsupportedModelError, match="a.input_projection.weight. has shape"):
        AudioEncoder(bins)
    layers = rewrite_gguf(mmproj, tmp_path / "layers.gguf", {"clip.audio.block_count": 3})
    with pytest.raises(UnsupportedModelError, match="a.blk.2"):
        AudioEncoder(layers)
    text = fixtures_dir / "gemma4-tiny-mm" / "model-f32.gguf"
    with pytest.raises(UnsupportedModelError, match="no audio encoder"):
        AudioEncoder(text)
    with pytest.raises(GGUFError, match="absent.gguf"):
        AudioEncoder(tmp_path / "absent.gguf")
    truncated = tmp_path / "truncated.gguf"
    shutil.copyfile(fixtures_dir / "gemma4-tiny-mm" / "mmproj-f32.gguf", truncated)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    with pytest.raises(GGUFError, match="truncated.gguf"):
        AudioEncoder(truncated)
