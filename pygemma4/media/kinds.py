"""The kinds of media a chat holds, and one image or clip made ready for its tower."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AUDIO", "IMAGE", "MEDIA_KINDS", "MediaKind", "PreparedMedia"]


@dataclass(frozen=True)
class MediaKind:
    """A kind of media in chats: its content part type and its special tokens (begin, one per
    soft token, end)."""

    name: str
    tokens: tuple[str, str, str]


IMAGE = MediaKind("image", ("<|image>", "<|image|>", "<image|>"))
AUDIO = MediaKind("audio", ("<|audio>", "<|audio|>", "<audio|>"))
MEDIA_KINDS = {kind.name: kind for kind in (IMAGE, AUDIO)}


@dataclass(frozen=True)
class PreparedMedia:
    """One image or clip as its tower reads it: `features` float32 [rows, width] (an image's
    16×16 patches, a clip's log-mel frames), `grid` the image's (rows, cols) of patches ((0, 0)
    for a clip), `n_tokens` the soft tokens it becomes, `digest` a hash of its decoded
    content (an image's pixels and the size they were resized to, a clip's samples); with
    `bidirectional`, its soft tokens attend to each other in both directions (the unified
    models' images)."""

    kind: MediaKind
    features: np.ndarray
    n_tokens: int
    digest: str
    grid: tuple[int, int] = (0, 0)
    bidirectional: bool = False
