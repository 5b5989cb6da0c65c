"""Images and clips made ready for a projector file's towers, without the towers' weights: the
work that decoding and preprocessing do (Pillow, the log-mel features), kept apart from the
encoders so that a server does it where it tokenizes, and the engine the same way in-process.
"""

from __future__ import annotations

from typing import Any

from pygemma4.errors import MediaError, UnsupportedModelError, located
from pygemma4.media.audio_encoder import conformer_config, prepare_audio
from pygemma4.media.image import SOFT_TOKEN_BUDGETS, ImageInput, image_patches
from pygemma4.media.kinds import IMAGE, MediaKind, PreparedMedia
from pygemma4.mmproj import MmprojFile, VisionConfig

__all__ = ["IMAGE_DETAILS", "ImageBudget", "MediaPreprocessor", "checked_vision", "prepare_image"]

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


class MediaPreprocessor:
    """What the towers of a checked projector file read, made from images (at most
    `max_image_tokens` soft tokens each) and clips; `vision` / `audio` are None for a tower the
    file lacks."""

    def __init__(self, mmproj: MmprojFile, max_image_tokens: int) -> None:
        self.path = mmproj.gguf.path
        self.max_image_tokens = max_image_tokens
        self.vision = None if mmproj.vision is None else checked_vision(mmproj, max_image_tokens)
        with located(self.path):
            self.audio = None if mmproj.audio is None else conformer_config(mmproj)

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
        """`source` as its tower reads it, an image at the budget `image_budget(budget,
        default_budget)` gives; MediaError where the file has no tower for it."""
        if kind is IMAGE:
            if self.vision is None:
                raise MediaError(f"{self.path} has no vision encoder: it takes no images")
            max_tokens = self.image_budget(budget, default_budget)
            return prepare_image(self.vision, max_tokens, source, name)
        if self.audio is None:
            raise MediaError(f"{self.path} has no audio encoder: it takes no audio")
        return prepare_audio(self.audio, source, name)
