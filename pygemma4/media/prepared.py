"""Images and clips made ready for a projector file's towers, without the towers' weights: the
work that decoding and preprocessing do (Pillow, the log-mel features), kept apart from the
encoders so that a server does it where it tokenizes, and the engine the same way in-process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pygemma4.config import ModelFile
from pygemma4.errors import MediaError, UnsupportedModelError, located
from pygemma4.gguf_file import GGUFFile, read_gguf
from pygemma4.media.audio_encoder import (
    RAW_FRAMES,
    AudioEncoderConfig,
    audio_encoder_config,
    conformer_config,
    prepare_audio,
)
from pygemma4.media.image import SOFT_TOKEN_BUDGETS, ImageInput, image_patches
from pygemma4.media.image_blocks import (
    BLOCK_PROJECTOR,
    ImageBlockConfig,
    image_block_config,
    prepare_image_blocks,
)
from pygemma4.media.kinds import IMAGE, MediaKind, PreparedMedia
from pygemma4.mmproj import (
    MmprojFile,
    VisionConfig,
    check_pairing,
    check_widths,
    open_mmproj,
)

__all__ = [
    "IMAGE_DETAILS",
    "ImageBudget",
    "MediaPreprocessor",
    "ProjectorFile",
    "checked_vision",
    "open_projector",
    "prepare_image",
    "read_projector",
]

# OpenAI's `image_url.detail`: "low" is the smallest budget, "high" the largest allowed, "auto"
# the request's default.
IMAGE_DETAILS = ("low", "high", "auto")

ImageBudget = int | str | None
"""What a request or an image part asks of an image's soft tokens: a budget (70, 140, 280,
560, 1120), one of IMAGE_DETAILS, or None for the default."""


def checked_vision(mmproj: MmprojFile, max_image_tokens: int) -> VisionConfig:
    """The vision tower's configuration, where the engine can run it with images of at most
    `max_image_tokens` soft tokens (UnsupportedModelError, MediaError for a bad budget)."""
    vision = mmproj.vision
    if vision is None:
        raise UnsupportedModelError(f"{mmproj.gguf.path}: the file has no vision encoder")
    if vision.standardize:
        raise UnsupportedModelError(
            f"{mmproj.gguf.path}: vision towers with standardized outputs (v.std_bias) are "
            "not supported"
        )
    if max_image_tokens not in SOFT_TOKEN_BUDGETS:
        raise MediaError(
            f"max_image_tokens must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, "
            f"not {max_image_tokens!r}"
        )
    return vision


def prepare_image(
    vision: VisionConfig, max_image_tokens: int, image: ImageInput, name: str | None = None
) -> PreparedMedia:
    """`image` (a path, bytes, data URI, PIL image or uint8 array) decoded and cut into the
    patches of `vision`, resized to at most `max_image_tokens` soft tokens."""
    patches = image_patches(image, max_image_tokens, vision.patch_size, vision.pooling, name)
    rows, cols = patches.grid
    if max(rows, cols) > vision.n_pos:
        raise MediaError(
            f"image {name or ''}: {rows}×{cols} patches exceed the tower's position tables "
            f"({vision.n_pos} per side)"
        )
    return PreparedMedia(IMAGE, patches.pixels, patches.n_soft_tokens, patches.digest, patches.grid)


@dataclass(frozen=True)
class ProjectorFile:
    """A projector GGUF checked against its model. `mmproj`: the file as `open_mmproj` reads
    the encoder towers of E2B/E4B-style models (`gemma4v`, `gemma4a`), None for a unified
    model's file; `blocks`: the unified models' image input (`gemma4uv`); `audio`: the audio
    input's hyperparameters (Conformer or raw frames). None for what the file lacks."""

    gguf: GGUFFile
    mmproj: MmprojFile | None
    blocks: ImageBlockConfig | None
    audio: AudioEncoderConfig | None


def read_projector(path: str | os.PathLike[str]) -> ProjectorFile:
    """The projector GGUF at `path`, checked on its own (GGUFError, UnsupportedModelError
    naming the file)."""
    gguf = read_gguf(path)
    meta = gguf.metadata
    unified = (
        meta.get("clip.vision.projector_type") == BLOCK_PROJECTOR
        or meta.get("clip.audio.projector_type") == RAW_FRAMES
    )
    if not unified:
        mmproj = open_mmproj(gguf.path)
        with located(gguf.path):
            audio = None if mmproj.audio is None else conformer_config(mmproj)
        return ProjectorFile(gguf, mmproj, None, audio)
    blocks = image_block_config(gguf) if meta.get("clip.has_vision_encoder", False) else None
    audio = audio_encoder_config(gguf) if meta.get("clip.has_audio_encoder", False) else None
    return ProjectorFile(gguf, None, blocks, audio)


def open_projector(path: str | os.PathLike[str], model: ModelFile) -> ProjectorFile:
    """The projector GGUF at `path`, checked on its own and against `model` (GGUFError,
    UnsupportedModelError, MmprojMismatchError naming the files)."""
    projector = read_projector(path)
    if projector.mmproj is not None:
        check_pairing(projector.mmproj, model)
        return projector
    check_widths(
        projector.gguf.path,
        model,
        {
            name: None if config is None else config.embedding_dim
            for name, config in (("vision", projector.blocks), ("audio", projector.audio))
        },
    )
    return projector


class MediaPreprocessor:
    """What the inputs of a checked projector file read, made from images (at most
    `max_image_tokens` soft tokens each) and clips; `vision` (an encoder tower's), `blocks`
    (the unified models' image blocks) and `audio` are None for an input the file lacks."""

    def __init__(self, projector: ProjectorFile, max_image_tokens: int) -> None:
        self.path = projector.gguf.path
        self.max_image_tokens = max_image_tokens
        mmproj = projector.mmproj
        self.vision = (
            None
            if mmproj is None or mmproj.vision is None
            else checked_vision(mmproj, max_image_tokens)
        )
        self.blocks = projector.blocks
        if self.blocks is not None and max_image_tokens not in SOFT_TOKEN_BUDGETS:
            raise MediaError(
                f"max_image_tokens must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, "
                f"not {max_image_tokens!r}"
            )
        self.audio = projector.audio

    def takes(self, kind: MediaKind) -> bool:
        """Whether the file has an input for `kind`."""
        if kind is IMAGE:
            return self.vision is not None or self.blocks is not None
        return self.audio is not None

    @property
    def image_call_tokens(self) -> int:
        """The fewest tokens a forward call must take so that every image fits one: images
        whose soft tokens attend to each other in both directions are computed in one call
        (max_image_tokens); 0 where images have no such need."""
        return self.max_image_tokens if self.blocks is not None else 0

    def image_budget(self, asked: ImageBudget, default: ImageBudget = None) -> int:
        """The soft tokens an image gets at most where its part asks for `asked` and its
        request for `default` (None: this preprocessor's `max_image_tokens`, also the most
        any image gets); MediaError naming a value that is no budget or detail, or a budget
        above the most."""
        if asked is None or asked == "auto":
            return self.max_image_tokens if default is None else self.image_budget(default)
        if asked == "low":
            return SOFT_TOKEN_BUDGETS[0]
        if asked == "high":
            return self.max_image_tokens
        if isinstance(asked, bool) or not isinstance(asked, int) or asked not in SOFT_TOKEN_BUDGETS:
            raise MediaError(
                f"an image's budget must be a number of soft tokens "
                f"({', '.join(map(str, SOFT_TOKEN_BUDGETS))}) or a detail "
                f"({', '.join(IMAGE_DETAILS)}), not {asked!r}"
            )
        if asked > self.max_image_tokens:
            raise MediaError(
                f"max_image_tokens {asked} is more than {self.max_image_tokens}, the most soft "
                "tokens per image set at start (max_image_tokens, --max-image-tokens); allowed: "
                f"{', '.join(str(b) for b in SOFT_TOKEN_BUDGETS if b <= self.max_image_tokens)}"
            )
        return asked

    def prepare(
        self,
        kind: MediaKind,
        source: Any,
        name: str | None = None,
        budget: ImageBudget = None,
        default_budget: ImageBudget = None,
    ) -> PreparedMedia:
        """`source` as its input reads it, an image at the budget `image_budget(budget,
        default_budget)` gives; MediaError where the file has no input for it."""
        if kind is IMAGE:
            if not self.takes(IMAGE):
                raise MediaError(f"{self.path} has no vision encoder: it takes no images")
            max_tokens = self.image_budget(budget, default_budget)
            if self.blocks is not None:
                return prepare_image_blocks(self.blocks, max_tokens, source, name)
            assert self.vision is not None
            return prepare_image(self.vision, max_tokens, source, name)
        if self.audio is None:
            raise MediaError(f"{self.path} has no audio encoder: it takes no audio")
        return prepare_audio(self.audio, source, name)
