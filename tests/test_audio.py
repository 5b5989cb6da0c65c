"""Audio input: WAV decoding of every common format, resampling to 16 kHz, log-mel features
equal to transformers' Gemma 4 feature extractor (stored fixture outputs and the extractor run
live), and a clear AudioError for every kind of bad input."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile

from pygemma4.errors import Gemma4Error
from pygemma4.media.audio import (
    MAX_SAMPLES,
    MIN_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    decode_wav,
    log_mel,
    prepare_samples,
)

MEL_ATOL = 1e-4


@pytest.fixture(scope="module")
def extractor(mm_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoFeatureExtractor.from_pretrained(mm_dir / "hf")


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    scipy.io.wavfile.write(buffer, rate, samples)
    return buffer.getvalue()


def pcm24_bytes(samples: np.ndarray, rate: int, channels: int) -> bytes:
    """A 24-bit PCM WAV (scipy writes none) of int32 samples in the 24-bit range."""
    raw = samples.astype("<i4").reshape(-1).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(3)
        w.setframerate(rate)
        w.writeframes(raw)
    return buffer.getvalue()


def sweep(seconds: float, rate: int, noise: float = 0.05) -> np.ndarray:
    """A chirp from 200 Hz to about 1.1 kHz, with white noise of `noise` rms."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(rate)
    return 0.7 * np.sin(2 * np.pi * (200 + 900 * t) * t) + noise * rng.standard_normal(t.size)


@pytest.mark.parametrize("k", [0, 1])
def test_fixture_clips_give_the_stored_features(mm_dir, k):
    ref = np.load(mm_dir / "ref_mm.npz")
    samples = decode_wav(mm_dir / "inputs" / f"aud{k}.wav")
    np.testing.assert_array_equal(samples, ref[f"aud{k}/waveform"])
    mel = log_mel(samples)
    assert mel.features.shape == ref[f"aud{k}/input_features"].shape
    assert np.abs(mel.features - ref[f"aud{k}/input_features"]).max() <= MEL_ATOL
    np.testing.assert_array_equal(mel.mask, ref[f"aud{k}/input_features_mask"].astype(bool))


@pytest.mark.parametrize("n", [MIN_SAMPLES, 300, 384, 1000, 4321, 16_000, 77_777, MAX_SAMPLES])
def test_features_equal_the_extractor_run_live(extractor, n):
    rng = np.random.default_rng(n)
    samples = (0.3 * rng.standard_normal(n)).astype(np.float32)
    expected = extractor([samples], return_tensors="np")
    mel = log_mel(prepare_samples(samples, SAMPLE_RATE))
    assert mel.features.shape == expected["input_features"][0].shape
    assert np.abs(mel.features - expected["input_features"][0]).max() <= MEL_ATOL
    np.testing.assert_array_equal(mel.mask, expected["input_features_mask"][0])


@pytest.mark.parametrize(
    ("rate", "encode"),
    [
        (16_000, lambda x: (x * 32767).astype(np.int16)),
        (8_000, lambda x: (x * 127 + 128).astype(np.uint8)),
        (22_050, lambda x: (x * 2**31 * 0.999).astype(np.int32)),
        (44_100, lambda x: x.astype(np.float32)),
        (48_000, lambda x: x.astype(np.float64)),
    ],
    ids=["16k-int16", "8k-uint8", "22k-int32", "44k-float32", "48k-float64"],
)
@pytest.mark.parametrize("channels", [1, 2])
def test_any_format_decodes_to_the_clip_at_16k(extractor, rate, encode, channels):
    clip = sweep(0.5, rate, noise=0.0)
    pcm = np.stack([clip] * channels, axis=1) if channels > 1 else clip
    samples = decode_wav(wav_bytes(encode(pcm), rate))
    expected = sweep(0.5, SAMPLE_RATE, noise=0.0)  # the same chirp sampled at 16 kHz directly
    assert samples.dtype == np.float32 and samples.shape == expected.shape
    inner = slice(100, -100)  # the resampling filter's edges aside
    assert np.abs(samples[inner] - expected[inner]).max() < 0.02
    # Whatever the source, the features are the extractor's on the decoded samples.
    mel = log_mel(samples)
    live = extractor([samples], return_tensors="np")["input_features"][0]
    assert np.abs(mel.features - live).max() <= MEL_ATOL


def test_24_bit_stereo_decodes():
    clip = sweep(0.25, 16_000)
    ints = np.round(np.stack([clip, 0.5 * clip], axis=1) * (2**23 - 1)).astype(np.int32)
    stereo = decode_wav(pcm24_bytes(ints, 16_000, 2))
    assert np.abs(stereo - 0.75 * clip).max() < 1e-6  # the channels' mean
    mono = decode_wav(pcm24_bytes(np.round(clip * (2**23 - 1)).astype(np.int32), 16_000, 1))
    assert np.abs(mono - clip).max() < 1e-6


def _truncated() -> bytes:
    return wav_bytes((sweep(0.5, 16_000) * 32767).astype(np.int16), 16_000)[:3000]


def _bad_fmt() -> bytes:
    data = bytearray(wav_bytes((sweep(0.1, 16_000) * 32767).astype(np.int16), 16_000))
    data[20:22] = (77).to_bytes(2, "little")  # an unknown sample format code
    return bytes(data)


loud = (sweep(0.5, 16_000) * 32767).astype(np.int16)

BAD_FILES = {
    "empty file": (b"", "not a WAV"),
    "text": (b"hello, this is not audio at all" * 4, "not a WAV"),
    "png bytes": (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a WAV"),
    "riff, not wave": (b"RIFF\x24\x00\x00\x00AVI LIST" + bytes(32), "not a WAV"),
    "header only": (wav_bytes(loud, 16_000)[:12], "unreadable WAV"),
    "truncated data": (_truncated(), "truncated"),
    "unknown sample format": (_bad_fmt(), "unreadable WAV"),
    "over 30 s": (wav_bytes(np.ones(MAX_SAMPLES + 8000, np.int16), 16_000), "exceeds"),
    "digital silence": (wav_bytes(np.zeros(8000, np.int16), 16_000), "silent"),
    "no samples": (wav_bytes(np.zeros(0, np.int16), 16_000), "empty"),
    "under 10 ms": (wav_bytes(loud[:100], 16_000), "shorter than one feature frame"),
    "16 channels": (wav_bytes(np.ones((800, 16), np.int16), 16_000), "16 channels"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_files_are_refused(case):
    data, message = BAD_FILES[case]
    with pytest.raises(AudioError, match=message) as info:
        decode_wav(data, name="clip.wav")
    assert "clip.wav" in str(info.value)
    assert isinstance(info.value, Gemma4Error)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(AudioError, match="cannot read") as info:
        decode_wav(tmp_path / "absent.wav")
    assert "absent.wav" in str(info.value)


half = sweep(0.5, 16_000).astype(np.float32)

BAD_ARRAYS = {
    "nan": (np.where(np.arange(half.size) == 99, np.nan, half), 16_000, "NaN"),
    "inf": (np.where(np.arange(half.size) == 5, np.inf, half), 16_000, "infinite"),
    "three dimensions": (half.reshape(1, -1, 1), 16_000, "shape"),
    "channels first": (np.stack([half, half]), 16_000, "channels"),
    "complex": (half.astype(np.complex64), 16_000, "complex64"),
    "bool": (half > 0, 16_000, "bool"),
    "strings": (np.array(["a", "b"] * 200), 16_000, "<U1"),
    "a list": (half.tolist(), 16_000, "numpy array"),
    "rate zero": (half, 0, "not positive"),
    "rate float": (half, 16_000.0, "integer"),
    "empty": (np.zeros(0, np.float32), 16_000, "empty"),
    "silence": (np.zeros(16_000, np.float32), 16_000, "silent"),
    "31 s at 8 kHz": (np.full(31 * 8000, 0.1, np.float32), 8000, "exceeds"),
    "too short after resampling": (half[:300], 48_000, "shorter"),
}


@pytest.mark.parametrize("case", BAD_ARRAYS, ids=list(BAD_ARRAYS))
def test_bad_arrays_are_refused(case):
    samples, rate, message = BAD_ARRAYS[case]
    with pytest.raises(AudioError, match=message) as info:
        prepare_samples(samples, rate, name="mic")
    assert str(info.value).startswith("mic: ")
