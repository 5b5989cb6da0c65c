"""Byte-fallback BPE vocabularies for the models written here, and their GGUF metadata.

Every vocabulary starts with the same tokens (`base_vocabulary`): the special tokens, the 256
byte tokens, then printable ASCII, a space and a newline. Merged pieces follow, either learned
from a text (`learned_vocabulary`, the demo's) or enumerated to an exact size
(`enumerated_vocabulary`, the synthetic models').
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from gguf import TokenType

__all__ = [
    "MIN_VOCAB",
    "SPACE",
    "Vocabulary",
    "base_vocabulary",
    "enumerated_vocabulary",
    "learned_vocabulary",
    "tokenizer_metadata",
]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPACE = "\u2581"  # how the vocabulary spells a space
# Printable ASCII, a space and a newline: one token each, after the byte tokens.
CHARACTERS = (*(chr(c) for c in range(0x21, 0x7F)), SPACE, "\n")
# Enumerated pieces are spelled with these: spaces and lower-case letters.
_PIECE_ALPHABET = (SPACE, *"abcdefghijklmnopqrstuvwxyz")


class Vocabulary(NamedTuple):
    """A BPE vocabulary as a GGUF holds it."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    merges: list[str]  # "left right", highest priority first


def base_vocabulary() -> tuple[list[str], list[int]]:
    """The tokens every vocabulary starts with, and their token types: the special tokens
    (SPECIAL_TOKENS, control tokens), the 256 byte tokens, then CHARACTERS."""
    tokens = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *CHARACTERS]
    types = [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    types += [int(TokenType.BYTE)] * 256 + [int(TokenType.NORMAL)] * len(CHARACTERS)
    return tokens, types


MIN_VOCAB = len(base_vocabulary()[0])


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from `text`: the most frequent adjacent pair first, ties broken
    by the pair's spelling, stopping early when no pair occurs twice."""
    symbols = list(text)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts = Counter(zip(symbols, symbols[1:], strict=False))
        if not counts:
            break
        pair, count = min(counts.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break
        merges.append(pair)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return merges


def learned_vocabulary(text: str, n_merges: int) -> Vocabulary:
    """The base vocabulary, then the pieces of up to `n_merges` merges learned from `text`
    (its spaces spelled SPACE; merges may cross them), each new piece scored by its rank."""
    tokens, types = base_vocabulary()
    scores = [0.0] * len(tokens)
    known = set(tokens)
    merges = _learn_merges(SPACE.join(text.split()), n_merges)
    for rank, (left, right) in enumerate(merges):
        piece = left + right
        if piece not in known:
            known.add(piece)
            tokens.append(piece)
            types.append(int(TokenType.NORMAL))
            scores.append(-float(rank + 1))
    return Vocabulary(tokens, scores, types, [f"{a} {b}" for a, b in merges])


def enumerated_vocabulary(size: int) -> Vocabulary:
    """A vocabulary of exactly `size` tokens (at least MIN_VOCAB).

    The base vocabulary, then pieces over spaces and lower-case letters, each the merge of a
    shorter piece and one letter (every pair, then every triple, ...), so that every piece is
    reachable by the merges, shortest first.
    """
    tokens, types = base_vocabulary()
    n_pieces = size - len(tokens)
    pieces: list[str] = []
    merges: list[str] = []
    level: Sequence[str] = _PIECE_ALPHABET
    while len(pieces) < n_pieces:
        longer = []
        for left in level:
            for right in _PIECE_ALPHABET:
                if len(pieces) == n_pieces:
                    break
                pieces.append(left + right)
                merges.append(f"{left} {right}")
                longer.append(left + right)
        level = longer
    scores = [0.0] * len(tokens) + [-float(rank + 1) for rank in range(len(pieces))]
    return Vocabulary(
        tokens + pieces, scores, types + [int(TokenType.NORMAL)] * len(pieces), merges
    )


def tokenizer_metadata(vocabulary: Vocabulary) -> dict[str, object]:
    """The metadata of a Gemma 4 BPE tokenizer with this vocabulary and the special token ids
    of SPECIAL_TOKENS."""
    return {
        "tokenizer.ggml.model": "gemma4",
        "tokenizer.ggml.tokens": vocabulary.tokens,
        "tokenizer.ggml.scores": vocabulary.scores,
        "tokenizer.ggml.token_type": vocabulary.token_types,
        "tokenizer.ggml.merges": vocabulary.merges,
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
        "tokenizer.ggml.unknown_token_id": UNK_ID,
        "tokenizer.ggml.padding_token_id": PAD_ID,
    }
