"""Gemma 4's audio input from an mmproj GGUF: clips to embeddings in the language model's space,
one row per 40 ms, the rows that replace a prompt's audio soft tokens. Two kinds: the Conformer
encoder over log-mel frames (`gemma4a`: E2B, E4B, ...) and the unified models' raw 640-sample
frames projected without an encoder (`gemma4ua`: 12B)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from pygemma4 import _core
from pygemma4.errors import Gemma4Error, UnsupportedModelError, located
from pygemma4.gguf_file import GGUFFile, read_gguf
from pygemma4.media.audio import (
    FRAME_LENGTH,
    HOP_LENGTH,
    N_MEL,
    AudioInput,
    audio_samples,
    log_mel,
    prepare_samples,
)
from pygemma4.media.kinds import AUDIO, PreparedMedia
from pygemma4.mmproj import MmprojFile, layer_norm_eps, open_mmproj, positive_int

CONFORMER = "gemma4a"
RAW_FRAMES = "gemma4ua"


@dataclass(frozen=True)
class AudioEmbedding:
    """One clip encoded: `embeddings` float32 [n_tokens, text width] (the rows that replace its
    soft tokens) and the `digest` of its 16 kHz samples."""

    embeddings: np.ndarray
    digest: str

    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])


class AudioEncoderError(Gemma4Error, ValueError):
    """Samples or features the loaded audio encoder cannot take."""


@dataclass(frozen=True)
class AudioEncoderConfig:
    """The audio input's hyperparameters as an mmproj file's `clip.audio.*` keys give them.

    `feature_dim` is what one row of features holds: mel bins (Conformer) or samples per soft
    token (raw frames); `n_layer` and `n_head` are 0 for raw frames."""

    projector: str
    feature_dim: int
    n_layer: int
    n_head: int
    eps: float
    embedding_dim: int


def audio_encoder_config(gguf: GGUFFile) -> AudioEncoderConfig:
    """The audio encoder's hyperparameters, checked; UnsupportedModelError for a file without a
    Gemma 4 audio encoder. A Conformer's come from `open_mmproj`, which checks the whole file;
    the raw-frame projector's (whose file `open_mmproj` does not take) from its few keys."""
    meta = gguf.metadata
    projector = meta.get("clip.audio.projector_type", meta.get("clip.projector_type"))
    if meta.get("clip.has_audio_encoder", False) and projector == CONFORMER:
        mmproj = open_mmproj(gguf.path)
        with located(gguf.path):
            return conformer_config(mmproj)
    with located(gguf.path):
        return _raw_frames_config(meta, projector)


def _raw_frames_config(meta: dict[str, object], projector: object) -> AudioEncoderConfig:
    if not meta.get("clip.has_audio_encoder", False):
        raise UnsupportedModelError("the file has no audio encoder (clip.has_audio_encoder)")
    if projector != RAW_FRAMES:
        raise UnsupportedModelError(
            f"audio projector type {projector!r} is not one of Gemma 4's "
            f"({CONFORMER!r}, {RAW_FRAMES!r})"
        )
    return AudioEncoderConfig(
        projector=projector,
        feature_dim=positive_int(meta, "clip.audio.embedding_length"),
        n_layer=0,
        n_head=0,
        eps=layer_norm_eps(meta, "clip.audio.attention.layer_norm_epsilon"),
        embedding_dim=positive_int(meta, "clip.audio.projection_dim"),
    )


def conformer_config(mmproj: MmprojFile) -> AudioEncoderConfig:
    """The Conformer's hyperparameters from a projector file `open_mmproj` checked."""
    audio = mmproj.audio
    if audio is None:
        raise UnsupportedModelError("the file has no audio encoder (clip.has_audio_encoder)")
    if audio.n_mel != N_MEL:
        raise UnsupportedModelError(f"{audio.n_mel} mel bins; the feature extractor makes {N_MEL}")
    return AudioEncoderConfig(
        projector=CONFORMER,
        feature_dim=audio.n_mel,
        n_layer=audio.n_layer,
        n_head=audio.n_head,
        eps=audio.eps,
        embedding_dim=audio.projection_dim,
    )


def encoder_tokens(config: AudioEncoderConfig, n_samples: int) -> int:
    """Soft tokens the encoder of `config` makes of a clip of n_samples samples at 16 kHz
    (about one per 40 ms)."""
    if config.projector == RAW_FRAMES:
        return -(-n_samples // config.feature_dim)
    # Log-mel frames that lie within the clip, then two stride-2 convolutions.
    frames = max(0, (n_samples - 1) // HOP_LENGTH) if n_samples > FRAME_LENGTH // 2 else 0
    return int(_core.AudioEncoder.n_tokens(frames)) if frames else 0


def prepare_audio(
    config: AudioEncoderConfig, audio: AudioInput, name: str | None = None
) -> PreparedMedia:
    """`audio` (a WAV path, WAV bytes or float samples at 16 kHz) decoded to 16 kHz mono and
    turned into what the encoder of `config` reads."""
    samples = audio_samples(audio, name)
    digest = hashlib.sha256(samples.tobytes()).hexdigest()
    features = encoder_features(config, samples)
    return PreparedMedia(AUDIO, features, encoder_tokens(config, samples.size), digest)


def encoder_features(config: AudioEncoderConfig, samples: np.ndarray) -> np.ndarray:
    """What the encoder of `config` reads of 16 kHz samples (from `prepare_samples`): the
    log-mel frames within the clip [frames, 128] (Conformer), or the samples zero-padded and
    cut into frames [tokens, 640] (raw frames)."""
    if config.projector == RAW_FRAMES:
        width = config.feature_dim
        frames = np.zeros(-(-samples.size // width) * width, dtype=np.float32)
        frames[: samples.size] = samples
        return frames.reshape(-1, width)
    mel = log_mel(samples)
    return mel.features[mel.mask]


class AudioEncoder:
    """The audio input of an mmproj GGUF (projector `gemma4a` or `gemma4ua`), on the CPU: from
    its path, or from the file `open_mmproj` already read and checked."""

    def __init__(
        self, mmproj: str | os.PathLike[str] | MmprojFile, threads: int | None = None
    ) -> None:
        if isinstance(mmproj, MmprojFile):
            gguf = mmproj.gguf
            with located(gguf.path):
                config = conformer_config(mmproj)
        else:
            gguf = read_gguf(mmproj)
            config = audio_encoder_config(gguf)
        self.config = config
        n_threads = threads or max(1, os.cpu_count() or 1)
        with located(gguf.path):
            tensors = [
                _core.TensorEntry(t.name, t.type_id, list(t.shape), t.offset, t.nbytes)
                for t in gguf.tensors.values()
                if t.name.startswith(("a.", "mm.a."))
            ]
            try:
                if config.projector == CONFORMER:
                    self._core = _core.AudioEncoder(
                        str(gguf.path),
                        tensors,
                        config.feature_dim,
                        config.n_layer,
                        config.n_head,
                        config.eps,
                        n_threads,
                    )
                else:
                    self._core = _core.AudioFrameProjector(
                        str(gguf.path), tensors, config.eps, n_threads
                    )
            except ValueError as e:
                raise UnsupportedModelError(str(e)) from None
            if config.projector == RAW_FRAMES and self._core.frame_samples != config.feature_dim:
                raise UnsupportedModelError(
                    f"mm.a.input_projection reads {self._core.frame_samples} samples, "
                    f"clip.audio.embedding_length says {config.feature_dim}"
                )
            if self._core.embedding_dim != config.embedding_dim:
                raise UnsupportedModelError(
                    f"mm.a.input_projection makes {self._core.embedding_dim} values, "
                    f"clip.audio.projection_dim says {config.embedding_dim}"
                )
        self.path = gguf.path

    def n_tokens(self, n_samples: int) -> int:
        """Soft tokens of a clip of n_samples samples at 16 kHz (about one per 40 ms)."""
        return encoder_tokens(self.config, n_samples)

    def features(self, samples: np.ndarray) -> np.ndarray:
        """What the encoder reads of 16 kHz samples (see `encoder_features`)."""
        return encoder_features(self.config, samples)

    def encode_features(self, features: np.ndarray) -> np.ndarray:
        """Embeddings [n_tokens, embedding_dim] of features as `features` makes them."""
        width = self.config.feature_dim
        if not isinstance(features, np.ndarray) or features.ndim != 2:
            raise AudioEncoderError(f"features must be a 2-D numpy array [rows, {width}]")
        if features.shape[1] != width or features.shape[0] < 1:
            raise AudioEncoderError(
                f"features of shape {features.shape}; expected [rows >= 1, {width}]"
            )
        if not np.all(np.isfinite(features)):
            raise AudioEncoderError("the features hold NaN or infinite values")
        rows = np.ascontiguousarray(features, dtype=np.float32)
        if self.config.projector == RAW_FRAMES:
            return self._core.embed(rows)
        return self._core.encode(rows)

    def embed(self, samples: np.ndarray, sample_rate: int, name: str = "audio") -> np.ndarray:
        """Embeddings [n_tokens, embedding_dim] of a clip: samples as `prepare_samples` takes
        them ([n] or [n, channels], any rate)."""
        return self.encode_features(self.features(prepare_samples(samples, sample_rate, name)))

    def embed_input(self, audio: AudioInput, name: str | None = None) -> AudioEmbedding:
        """The embeddings of a clip given as a WAV path, WAV bytes or 16 kHz samples."""
        return self.encode(prepare_audio(self.config, audio, name))

    def encode(self, clip: PreparedMedia) -> AudioEmbedding:
        """The embeddings of a clip `prepare_audio` made for this encoder."""
        embeddings = self.encode_features(clip.features)
        if len(embeddings) != clip.n_tokens:
            raise AudioEncoderError(
                f"the encoder made {len(embeddings)} rows of a clip of {clip.n_tokens} soft tokens"
            )
        return AudioEmbedding(embeddings, clip.digest)


def embed_audio(
    mmproj: str | os.PathLike[str] | AudioEncoder,
    samples: np.ndarray,
    sample_rate: int = 16_000,
) -> np.ndarray:
    """The language-model embeddings [n_tokens, embedding_dim] of a clip, from an mmproj file's
    path or an AudioEncoder already loaded from one."""
    encoder = mmproj if isinstance(mmproj, AudioEncoder) else AudioEncoder(mmproj)
    return encoder.embed(samples, sample_rate)
