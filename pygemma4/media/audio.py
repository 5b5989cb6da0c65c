"""Audio for Gemma 4: WAV files and sample arrays to 16 kHz mono, and the log-mel features the
audio encoder reads (the same numbers as transformers' Gemma4AudioFeatureExtractor)."""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io.wavfile
import scipy.signal

from pygemma4.errors import Gemma4Error

SAMPLE_RATE = 16_000
# Gemma 4 hears at most 30 s per clip (the feature extractor's max_length of 480,000 samples).
MAX_SECONDS = 30
MAX_SAMPLES = SAMPLE_RATE * MAX_SECONDS
MAX_CHANNELS = 8
N_MEL = 128
FRAME_LENGTH = 320  # 20 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
MEL_FLOOR = 1e-3
# The first frame is centred on sample 0 and counts once the clip reaches past its window.
MIN_SAMPLES = FRAME_LENGTH // 2 + 1
# The extractor pads every clip with zeros to a multiple of this many samples.
PAD_MULTIPLE = 128


class AudioError(Gemma4Error, ValueError):
    """An audio input that cannot be heard: not a readable WAV, truncated, empty, silent,
    longer than the model's limit, of an unusable shape or type, or holding NaN/inf."""


@dataclass(frozen=True)
class MelFeatures:
    """Log-mel frames of one clip: `features` float32 [frames, 128] (zero on frames past the
    clip's end) and `mask` bool [frames] (True where the frame lies within the clip)."""

    features: np.ndarray
    mask: np.ndarray


AudioInput = str | os.PathLike[str] | bytes | np.ndarray
"""A clip: a WAV file's path, a WAV file's bytes, or samples at 16 kHz ([n] or [n, channels])."""


def audio_samples(source: AudioInput, name: str | None = None) -> np.ndarray:
    """The 16 kHz mono float32 samples of a clip given as an AudioInput."""
    if isinstance(source, np.ndarray):
        return prepare_samples(source, SAMPLE_RATE, name or "audio samples")
    if not isinstance(source, (str, bytes, os.PathLike)):
        raise AudioError(
            f"{name or 'audio'}: expected a WAV path, WAV bytes or a sample array, "
            f"not {type(source).__name__}"
        )
    return decode_wav(source, name)


def decode_wav(source: bytes | str | os.PathLike[str], name: str | None = None) -> np.ndarray:
    """The 16 kHz mono float32 samples of a WAV file (path or bytes) of any sample rate,
    channel count and PCM/float sample format."""
    label = name or (str(source) if not isinstance(source, bytes) else "audio bytes")
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise AudioError(f"{label}: cannot read the file ({e.strerror or e})") from None
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        raise AudioError(f"{label}: not a WAV file (no RIFF/WAVE header)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.io.wavfile.WavFileWarning)
        try:
            rate, samples = scipy.io.wavfile.read(io.BytesIO(data))
        except scipy.io.wavfile.WavFileWarning as e:
            raise AudioError(f"{label}: truncated or damaged WAV ({e})") from None
        except (ValueError, struct.error, EOFError, OverflowError, MemoryError) as e:
            raise AudioError(f"{label}: unreadable WAV ({e or type(e).__name__})") from None
    return prepare_samples(samples, rate, name=label)


def prepare_samples(samples: np.ndarray, sample_rate: int, name: str = "audio") -> np.ndarray:
    """Samples as the model hears them: float32 mono at 16 kHz, checked.

    `samples` is [n] or [n, channels] (channels averaged), floats in [-1, 1] or integer PCM
    (scaled by its full range; unsigned 8-bit centred at 128)."""
    if not isinstance(samples, np.ndarray):
        raise AudioError(f"{name}: samples must be a numpy array, got {type(samples).__name__}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise AudioError(f"{name}: sample rate must be an integer, got {sample_rate!r}")
    if sample_rate < 1:
        raise AudioError(f"{name}: sample rate {sample_rate} Hz is not positive")
    if samples.ndim not in (1, 2):
        raise AudioError(f"{name}: samples must be [n] or [n, channels], got shape {samples.shape}")
    if samples.ndim == 2 and not 1 <= samples.shape[1] <= MAX_CHANNELS:
        raise AudioError(
            f"{name}: {samples.shape[1]} channels (shape {samples.shape}); expected 1 to "
            f"{MAX_CHANNELS} channels as [n, channels]"
        )
    signal = _to_float(samples, name)
    if signal.ndim == 2:
        signal = signal.mean(axis=1)
    if signal.size == 0:
        raise AudioError(f"{name}: the clip is empty")
    seconds = signal.size / sample_rate
    if seconds > MAX_SECONDS:
        raise AudioError(
            f"{name}: {seconds:.2f} s of audio exceeds the model's limit of {MAX_SECONDS} s"
        )
    if not np.any(signal):
        raise AudioError(f"{name}: the clip is silent (every sample is zero)")
    if sample_rate != SAMPLE_RATE:
        g = math.gcd(SAMPLE_RATE, int(sample_rate))
        signal = scipy.signal.resample_poly(signal, SAMPLE_RATE // g, int(sample_rate) // g)
    signal = signal.astype(np.float32)
    if signal.size < MIN_SAMPLES:
        raise AudioError(
            f"{name}: {signal.size} samples at {SAMPLE_RATE} Hz is shorter than one feature "
            f"frame needs ({MIN_SAMPLES} samples, about 10 ms)"
        )
    return signal


def _to_float(samples: np.ndarray, name: str) -> np.ndarray:
    """Samples as float64 in [-1, 1]; NaN/inf and non-numeric types refused."""
    kind = samples.dtype.kind
    if kind == "f":
        if not np.all(np.isfinite(samples)):
            raise AudioError(f"{name}: the samples hold NaN or infinite values")
        return samples.astype(np.float64)
    if kind == "u" and samples.dtype.itemsize == 1:
        return (samples.astype(np.float64) - 128.0) / 128.0
    if kind == "i":
        return samples.astype(np.float64) / float(2 ** (8 * samples.dtype.itemsize - 1))
    raise AudioError(
        f"{name}: samples of type {samples.dtype} are not audio (expected floats, "
        "signed integer PCM or unsigned 8-bit PCM)"
    )


def _mel_filters() -> np.ndarray:
    """HTK-scale triangular mel filters without normalisation, [FFT_LENGTH // 2 + 1, N_MEL]."""

    def to_mel(hz: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    edges_mel = np.linspace(to_mel(0.0), to_mel(SAMPLE_RATE / 2), N_MEL + 2)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    bins = np.linspace(0, SAMPLE_RATE // 2, FFT_LENGTH // 2 + 1)
    width = np.diff(edges)
    offset = edges[None, :] - bins[:, None]
    rising = -offset[:, :-2] / width[:-1]
    falling = offset[:, 2:] / width[1:]
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


_MEL_FILTERS = _mel_filters()
# Periodic Hann window.
_WINDOW = np.hanning(FRAME_LENGTH + 1)[:-1].astype(np.float32)


def log_mel(samples: np.ndarray) -> MelFeatures:
    """The log-mel frames of 16 kHz mono float32 samples (from `prepare_samples`): 20 ms Hann
    frames every 10 ms, the first centred on sample 0, magnitude spectrum through 128 mel
    filters up to 8 kHz, log(mel + 0.001)."""
    n = samples.size
    padded_length = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
    signal = np.zeros(FRAME_LENGTH // 2 + padded_length, dtype=np.float32)
    signal[FRAME_LENGTH // 2 : FRAME_LENGTH // 2 + n] = samples
    n_frames = (signal.size - FRAME_LENGTH - 1) // HOP_LENGTH + 1
    starts = np.arange(n_frames) * HOP_LENGTH
    frames = signal[starts[:, None] + np.arange(FRAME_LENGTH)[None, :]] * _WINDOW
    magnitude = np.abs(np.fft.rfft(frames, n=FFT_LENGTH, axis=-1))
    features = np.log(magnitude @ _MEL_FILTERS + MEL_FLOOR).astype(np.float32)
    # A frame counts while the sample just past its window is still part of the clip.
    mask = starts + FRAME_LENGTH < FRAME_LENGTH // 2 + n
    features[~mask] = 0.0
    return MelFeatures(features=features, mask=mask)
