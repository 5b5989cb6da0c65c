"""A model's projector file opened for the engine and the server: the preprocessing of images
and clips, and the towers that turn what it made into the embeddings of their soft tokens."""

from __future__ import annotations

import os

import numpy as np

from pygemma4.config import ModelFile
from pygemma4.errors import MediaError
from pygemma4.media.audio_encoder import AudioEncoder
from pygemma4.media.kinds import IMAGE, MediaKind, PreparedMedia
from pygemma4.media.prepared import MediaPreprocessor
from pygemma4.mmproj import open_mmproj
from pygemma4.vision import VisionTower

__all__ = ["MediaEncoders"]


class MediaEncoders:
    """The towers of the projector GGUF at `mmproj`, checked against `model` (each image at
    most `max_image_tokens` soft tokens), and the `preprocessor` of their input. The vision
    tower computes on `backend`; the audio tower on the CPU whatever the backend."""

    def __init__(
        self,
        mmproj: str | os.PathLike[str],
        model: ModelFile,
        max_image_tokens: int,
        threads: int,
        backend: str = "cpu",
        device: int = 0,
    ) -> None:
        projector = open_mmproj(mmproj, model)
        self.path = projector.gguf.path
        self.preprocessor = MediaPreprocessor(projector, max_image_tokens)
        self.vision = (
            None
            if projector.vision is None
            else VisionTower(projector, max_image_tokens, threads, backend, device)
        )
        self.audio = None if projector.audio is None else AudioEncoder(projector, threads)

    def takes(self, kind: MediaKind) -> bool:
        """Whether the file has a tower for `kind`."""
        return (self.vision if kind is IMAGE else self.audio) is not None

    def encode(self, media: PreparedMedia) -> np.ndarray:
        """The embeddings float32 [n_tokens, model width] of an image or clip the
        preprocessor prepared."""
        if media.kind is IMAGE:
            if self.vision is None:
                raise MediaError(f"{self.path} has no vision encoder: it takes no images")
            return self.vision.encode(media).embeddings
        if self.audio is None:
            raise MediaError(f"{self.path} has no audio encoder: it takes no audio")
        return self.audio.encode(media).embeddings
