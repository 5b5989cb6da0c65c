"""The token ids benchmarks feed: BOS, then ids drawn at random from ordinary text pieces."""

from __future__ import annotations

import numpy as np

from pygemma4.errors import require_positive

BOS = 2
"""Gemma's beginning-of-sequence id, which starts every sequence a benchmark feeds."""


def prompt_id_range(vocab_size: int) -> tuple[int, int]:
    """The token ids [low, high) benchmarks draw from: the middle half of the vocabulary.

    Gemma's vocabularies keep their control, unused and byte tokens at the start and their
    multimodal ones at the end; the middle holds ordinary pieces of text.
    """
    require_positive("vocab_size", vocab_size)
    low = vocab_size // 4
    return low, max(low + 1, 3 * vocab_size // 4)


def random_ids(
    rng: np.random.Generator, vocab_size: int, shape: int | tuple[int, ...]
) -> np.ndarray:
    """Ids drawn uniformly from `prompt_id_range(vocab_size)`, int32 of `shape`."""
    low, high = prompt_id_range(vocab_size)
    return rng.integers(low, high, shape, dtype=np.int32)
