"""Gemma 4's audio encoder from an mmproj GGUF: clips to embeddings in the language model's
space, one row per 40 ms, the rows that replace a prompt's audio soft tokens."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pygemma4 import _core
from pygemma4.errors import Gemma4Error, UnsupportedModelError, located
from pygemma4.gguf_file import GGUFFile, read_gguf
from pygemma4.media.audio import N_MEL, log_mel, prepare_samples

AUDIO_PROJECTOR = "gemma4a"


class AudioEncoderError(Gemma4Error, ValueError):
    """Samples or features the loaded audio encoder cannot take."""


@dataclass(frozen=True)
class AudioEncoderConfig:
    """The audio encoder's hyperparameters as an mmproj file's `clip.audio.*` keys give them."""

    n_mel: int
    n_layer: int
    n_head: int
    eps: float
    embedding_dim: int


def audio_encoder_config(gguf: GGUFFile) -> AudioEncoderConfig:
    """The audio encoder's hyperparameters, checked; UnsupportedModelError for a file without a
    Gemma 4 audio encoder."""
    meta = gguf.metadata
    if not meta.get("clip.has_audio_encoder", False):
        raise UnsupportedModelError("the file has no audio encoder (clip.has_audio_encoder)")
    projector = meta.get("clip.audio.projector_type", meta.get("clip.projector_type"))
    if projector != AUDIO_PROJECTOR:
        raise UnsupportedModelError(
            f"audio projector type {projector!r} is not Gemma 4's {AUDIO_PROJECTOR!r}"
        )

    def integer(key: str) -> int:
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsupportedModelError(f"{key} is {value!r}, not a positive integer")
        return value

    eps = meta.get("clip.audio.attention.layer_norm_epsilon", 1e-6)
    if not isinstance(eps, float) or not 0 < eps < 1:
        raise UnsupportedModelError(f"clip.audio.attention.layer_norm_epsilon is {eps!r}")
    config = AudioEncoderConfig(
        n_mel=integer("clip.audio.num_mel_bins"),
        n_layer=integer("clip.audio.block_count"),
        n_head=integer("clip.audio.attention.head_count"),
        eps=eps,
        embedding_dim=integer("clip.audio.projection_dim"),
    )
    if config.n_mel != N_MEL:
        raise UnsupportedModelError(f"{config.n_mel} mel bins; the feature extractor makes {N_MEL}")
    return config


class AudioEncoder:
    """The audio encoder of an mmproj GGUF (projector `gemma4a`), computing on the CPU."""

    def __init__(self, mmproj_path: str | os.PathLike[str], threads: int | None = None) -> None:
        gguf = read_gguf(mmproj_path)
        with located(gguf.path):
            self.config = audio_encoder_config(gguf)
            tensors = [
                _core.TensorEntry(t.name, t.type_id, list(t.shape), t.offset, t.nbytes)
                for t in gguf.tensors.values()
                if t.name.startswith(("a.", "mm.a."))
            ]
            try:
                self._core = _core.AudioEncoder(
                    str(gguf.path),
                    tensors,
                    self.config.n_mel,
                    self.config.n_layer,
                    self.config.n_head,
                    self.config.eps,
                    threads or max(1, os.cpu_count() or 1),
                )
            except ValueError as e:
                raise UnsupportedModelError(str(e)) from None
        if self._core.embedding_dim != self.config.embedding_dim:
            raise UnsupportedModelError(
                f"{gguf.path}: mm.a.input_projection makes {self._core.embedding_dim} values, "
                f"clip.audio.projection_dim says {self.config.embedding_dim}"
            )
        self.path = gguf.path

    @staticmethod
    def n_tokens(n_frames: int) -> int:
        """Soft tokens made of n_frames log-mel frames (one per 4 frames, 40 ms)."""
        return int(_core.AudioEncoder.n_tokens(n_frames))

    def encode_features(self, features: np.ndarray) -> np.ndarray:
        """Embeddings [n_tokens, embedding_dim] of the valid log-mel frames [frames, 128]."""
        if not isinstance(features, np.ndarray) or features.ndim != 2:
            raise AudioEncoderError("features must be a 2-D numpy array [frames, mel bins]")
        if features.shape[1] != self.config.n_mel or features.shape[0] < 1:
            raise AudioEncoderError(
                f"features of shape {features.shape}; expected [frames >= 1, {self.config.n_mel}]"
            )
        if not np.all(np.isfinite(features)):
            raise AudioEncoderError("the features hold NaN or infinite values")
        return self._core.encode(np.ascontiguousarray(features, dtype=np.float32))

    def embed(self, samples: np.ndarray, sample_rate: int, name: str = "audio") -> np.ndarray:
        """Embeddings [n_tokens, embedding_dim] of a clip: samples as `prepare_samples` takes
        them ([n] or [n, channels], any rate)."""
        mel = log_mel(prepare_samples(samples, sample_rate, name=name))
        return self.encode_features(mel.features[mel.mask])


def embed_audio(
    mmproj: str | os.PathLike[str] | AudioEncoder,
    samples: np.ndarray,
    sample_rate: int = 16_000,
) -> np.ndarray:
    """The language-model embeddings [n_tokens, embedding_dim] of a clip, from an mmproj file's
    path or an AudioEncoder already loaded from one."""
    encoder = mmproj if isinstance(mmproj, AudioEncoder) else AudioEncoder(mmproj)
    return encoder.embed(samples, sample_rate)
