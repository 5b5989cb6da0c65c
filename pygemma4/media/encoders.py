"""A model's projector file opened for the engine and the server: the preprocessing of images
and clips, and the inputs that turn what it made into the embeddings of their soft tokens: an
encoder tower (E2B/E4B-style models) or the unified models' block and frame projections."""

from __future__ import annotations

import os

import numpy as np

from pygemma4.config import ModelFile
from pygemma4.errors import MediaError
from pygemma4.media.audio_encoder import AudioEncoder
from pygemma4.media.image import ImageInput
from pygemma4.media.image_blocks import ImageBlockEncoder
from pygemma4.media.kinds import IMAGE, ImageEmbedding, MediaKind, PreparedMedia
from pygemma4.media.prepared import MediaPreprocessor, open_projector
from pygemma4.vision import VisionTower

__all__ = ["MediaEncoders"]


class MediaEncoders:
    """The inputs of the projector GGUF at `mmproj`, checked against `model` (each image at
    most `max_image_tokens` soft tokens), and the `preprocessor` of what they read. A vision
    tower computes on `backend`; audio and the unified models' image blocks on the CPU
    whatever the backend."""

    def __init__(
        self,
        mmproj: str | os.PathLike[str],
        model: ModelFile,
        max_image_tokens: int,
        threads: int,
        backend: str = "cpu",
        device: int = 0,
    ) -> None:
        projector = open_projector(mmproj, model)
        self.path = projector.gguf.path
        self.preprocessor = MediaPreprocessor(projector, max_image_tokens)
        self.vision: VisionTower | ImageBlockEncoder | None = None
        if projector.blocks is not None:
            self.vision = ImageBlockEncoder(self.path, max_image_tokens, threads)
        elif projector.mmproj is not None and projector.mmproj.vision is not None:
            self.vision = VisionTower(projector.mmproj, max_image_tokens, threads, backend, device)
        self.audio = None
        if projector.mmproj is not None and projector.mmproj.audio is not None:
            self.audio = AudioEncoder(projector.mmproj, threads)
        elif projector.audio is not None:
            self.audio = AudioEncoder(self.path, threads)

    def takes(self, kind: MediaKind) -> bool:
        """Whether the file has an input for `kind`."""
        return (self.vision if kind is IMAGE else self.audio) is not None

    def embed_image(self, image: ImageInput, max_image_tokens: int | None = None) -> ImageEmbedding:
        """The embeddings of `image` (a path, bytes, data URI, PIL image or uint8 array), at
        most `max_image_tokens` soft tokens (by default and at most the file's budget)."""
        ready = self.preprocessor.prepare(IMAGE, image, budget=max_image_tokens)
        assert self.vision is not None  # the preprocessor refused images otherwise
        return self.vision.encode(ready)

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
