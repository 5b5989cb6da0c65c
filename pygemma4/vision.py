"""Gemma 4's vision tower on the core: images to the embeddings that replace their soft tokens."""

from __future__ import annotations

import os

from . import _core
from .errors import MediaError
from .media.image import DEFAULT_SOFT_TOKENS, ImageInput
from .media.kinds import ImageEmbedding, PreparedMedia
from .media.prepared import checked_vision, prepare_image
from .mmproj import MmprojFile

__all__ = ["ImageEmbedding", "VisionTower"]

# Tensors whose file shape the core reads as a matrix: the patch embedding's [p, p, 3, width]
# as [3p², width], the two position tables [width, n, 2] as [width, 2n].
_FLATTENED = ("v.patch_embd.weight", "v.position_embd.weight")


class VisionTower:
    """The vision tower of a projector file, computing on `backend` with `threads` threads;
    images are resized to at most `max_image_tokens` soft tokens (70, 140, 280, 560, 1120)."""

    def __init__(
        self,
        mmproj: MmprojFile,
        max_image_tokens: int = DEFAULT_SOFT_TOKENS,
        threads: int | None = None,
        backend: str = "cpu",
        device: int = 0,
    ) -> None:
        vision = checked_vision(mmproj, max_image_tokens)
        self.config = vision
        self.max_image_tokens = max_image_tokens
        entries = []
        for name in mmproj.tensor_names("v.") + ["mm.input_projection.weight"]:
            t = mmproj.gguf.tensors[name]
            shape = list(t.shape)
            if name in _FLATTENED:
                shape = [shape[0] * shape[1] * shape[2], shape[3]] if len(shape) == 4 else shape
                shape = [shape[0], shape[1] * shape[2]] if len(shape) == 3 else shape
            entries.append(_core.TensorEntry(t.name, t.type_id, shape, t.offset, t.nbytes))
        max_patches = max_image_tokens * vision.pooling**2
        self._encoder = _core.VisionEncoder(
            str(mmproj.gguf.path),
            entries,
            vision,
            max_patches,
            threads or max(1, os.cpu_count() or 1),
            backend,
            device,
        )

    def embed(self, image: ImageInput, name: str | None = None) -> ImageEmbedding:
        """The embeddings of `image` (a path, bytes, data URI, PIL image or uint8 array)."""
        return self.encode(prepare_image(self.config, self.max_image_tokens, image, name))

    def encode(self, image: PreparedMedia) -> ImageEmbedding:
        """The embeddings of an image `prepare_image` cut into this tower's patches."""
        rows, cols = image.grid
        pooled, embeddings = self._encoder.encode(image.features, rows, cols)
        if len(embeddings) != image.n_tokens:
            raise MediaError(
                f"the vision tower made {len(embeddings)} rows of an image of "
                f"{image.n_tokens} soft tokens"
            )
        return ImageEmbedding(embeddings, pooled, image.grid, image.digest)
