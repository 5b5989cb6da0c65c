"""The image input of Gemma 4's unified (12B-style) models from an mmproj GGUF (projector
`gemma4uv`): no encoder; each soft token is one block of raw pixels (patch_size × pooling per
side), embedded with LayerNorms, a dense layer and learned column / row positions, then
projected into the language model's space."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pygemma4 import _core
from pygemma4.config import _check_tensors
from pygemma4.errors import MediaError, UnsupportedModelError, located
from pygemma4.gguf_file import GGUFFile, read_gguf
from pygemma4.media.image import ImageInput, grid_positions, image_blocks
from pygemma4.media.kinds import IMAGE, ImageEmbedding, PreparedMedia
from pygemma4.mmproj import DEFAULT_POOLING, layer_norm_eps, positive_int

__all__ = [
    "BLOCK_PROJECTOR",
    "ImageBlockConfig",
    "ImageBlockEncoder",
    "image_block_config",
    "prepare_image_blocks",
]

BLOCK_PROJECTOR = "gemma4uv"
# transformers' unified image processor: 280 soft tokens unless told otherwise.
DEFAULT_BLOCK_TOKENS = 280
_V = "clip.vision."


@dataclass(frozen=True)
class ImageBlockConfig:
    """The block projector's shape: `block`×`block` pixel blocks, `width` the embedding before
    the projection, `n_pos` position-table entries per axis, `eps` the final RMS norm's,
    `embedding_dim` the language model's width."""

    block: int
    width: int
    n_pos: int
    eps: float
    embedding_dim: int


def image_block_config(gguf: GGUFFile) -> ImageBlockConfig:
    """The block projector's hyperparameters, its tensors checked against them;
    UnsupportedModelError naming the file for one without a `gemma4uv` image input."""
    meta = gguf.metadata
    with located(gguf.path):
        if not meta.get("clip.has_vision_encoder", False):
            raise UnsupportedModelError("the file has no vision input (clip.has_vision_encoder)")
        projector = meta.get(_V + "projector_type", meta.get("clip.projector_type"))
        if projector != BLOCK_PROJECTOR:
            raise UnsupportedModelError(
                f"vision projector type {projector!r} is not the unified models' "
                f"{BLOCK_PROJECTOR!r}"
            )
        patch = positive_int(meta, _V + "patch_size")
        pooling = meta.get(_V + "projector.scale_factor", DEFAULT_POOLING)
        if isinstance(pooling, bool) or not isinstance(pooling, int) or not 1 <= pooling <= 8:
            raise UnsupportedModelError(f"{_V}projector.scale_factor is {pooling!r}")
        width = positive_int(meta, _V + "embedding_length")
        dim = positive_int(meta, _V + "projection_dim")
        eps = layer_norm_eps(meta, _V + "attention.layer_norm_epsilon")
        table = gguf.tensors.get("v.position_embd.weight")
        if table is None or len(table.shape) != 3:
            raise UnsupportedModelError("tensor 'v.position_embd.weight' is missing or not 3-D")
        block = patch * pooling
        values = 3 * block * block
        expected: dict[str, tuple[int, ...]] = {
            "v.patch_norm.1.weight": (values,),
            "v.patch_norm.1.bias": (values,),
            "v.patch_embd.weight": (values, width),
            "v.patch_embd.bias": (width,),
            "v.patch_norm.2.weight": (width,),
            "v.patch_norm.2.bias": (width,),
            "v.position_embd.weight": (width, table.shape[1], 2),
            "v.patch_norm.3.weight": (width,),
            "v.patch_norm.3.bias": (width,),
            "mm.input_projection.weight": (width, dim),
        }
        ours = {
            name: info
            for name, info in gguf.tensors.items()
            if name.startswith("v.") or name == "mm.input_projection.weight"
        }
        _check_tensors(expected, ours)
    return ImageBlockConfig(block, width, table.shape[1], eps, dim)


def prepare_image_blocks(
    config: ImageBlockConfig, max_image_tokens: int, image: ImageInput, name: str | None = None
) -> PreparedMedia:
    """`image` (a path, bytes, data URI, PIL image or uint8 array) decoded, resized to at most
    `max_image_tokens` soft tokens and cut into the blocks of `config`; its soft tokens attend
    to each other in both directions (the model's `use_bidirectional_attention: vision`)."""
    blocks = image_blocks(image, max_image_tokens, config.block, name)
    rows, cols = blocks.grid
    if max(rows, cols) > config.n_pos:
        raise MediaError(
            f"image {name or ''}: {rows}×{cols} blocks exceed the projector's position "
            f"tables ({config.n_pos} per side)"
        )
    return PreparedMedia(
        IMAGE, blocks.pixels, blocks.n_soft_tokens, blocks.digest, blocks.grid, bidirectional=True
    )


class ImageBlockEncoder:
    """The `gemma4uv` image input of an mmproj file, on the CPU with `threads` threads; images
    are resized to at most `max_image_tokens` soft tokens (70, 140, 280, 560, 1120)."""

    def __init__(
        self,
        mmproj: str | os.PathLike[str],
        max_image_tokens: int = DEFAULT_BLOCK_TOKENS,
        threads: int | None = None,
    ) -> None:
        gguf = read_gguf(mmproj)
        self.config = image_block_config(gguf)
        self.max_image_tokens = max_image_tokens
        self.path = gguf.path
        entries = []
        for name, t in gguf.tensors.items():
            if not (name.startswith("v.") or name == "mm.input_projection.weight"):
                continue
            shape = list(t.shape)
            if name == "v.position_embd.weight":
                shape = [shape[0], shape[1] * shape[2]]
            entries.append(_core.TensorEntry(t.name, t.type_id, shape, t.offset, t.nbytes))
        with located(gguf.path):
            try:
                self._core = _core.ImageBlockProjector(
                    str(gguf.path), entries, self.config.eps, threads or max(1, os.cpu_count() or 1)
                )
            except ValueError as e:
                raise UnsupportedModelError(str(e)) from None

    def prepare(self, image: ImageInput, name: str | None = None) -> PreparedMedia:
        """`image` (a path, bytes, data URI, PIL image or uint8 array) decoded, resized and cut
        into this projector's blocks."""
        return prepare_image_blocks(self.config, self.max_image_tokens, image, name)

    def encode(self, image: PreparedMedia) -> ImageEmbedding:
        """The embeddings [n_tokens, embedding_dim] of an image `prepare` made (no tower:
        `pooled` is None)."""
        rows, cols = image.grid
        if image.kind is not IMAGE or rows * cols != len(image.features):
            raise MediaError(f"not an image of {rows}×{cols} blocks")
        embeddings = self._core.embed(image.features, grid_positions(rows, cols))
        return ImageEmbedding(embeddings, None, image.grid, image.digest)

    def embed(self, image: ImageInput, name: str | None = None) -> ImageEmbedding:
        """The embeddings [n_tokens, embedding_dim] that replace `image`'s soft tokens."""
        return self.encode(self.prepare(image, name))
