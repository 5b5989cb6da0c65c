"""The kinds of media a chat holds, one image or clip made ready for its tower, and an image
encoded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AUDIO", "IMAGE", "MEDIA_KINDS", "ImageEmbedding", "MediaKind", "PreparedMedia"]


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


@dataclass(frozen=True)
class ImageEmbedding:
    """One image encoded: `embeddings` float32 [n_tokens, text width] (the rows that replace its
    soft tokens), `pooled` float32 [n_tokens, tower width] (a vision tower's own output; None
    for the unified models' block projection, which has no tower), the patch `grid` and the
    `digest` of its decoded pixels (and the size they were resized to)."""

    embeddings: np.ndarray
    pooled: np.ndarray | None
    grid: tuple[int, int]
    digest: str

    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])
