"""Drafters for speculative decoding: what proposes the next tokens of many sequences at once,
for the target model to verify in one step. `AssistantDrafter` runs a Gemma 4 assistant GGUF
from the target's final hidden state and KV (see `assistant_config`); `NgramDrafter` looks the
newest tokens up in the text so far (prompt lookup), without a model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pygemma4 import _core
from pygemma4.assistant_config import AssistantFile, open_assistant
from pygemma4.errors import Gemma4Error
from pygemma4.kv import SequenceKv
from pygemma4.runner import ModelRunner

DEFAULT_MAX_DRAFT_TOKENS = 8
NGRAM = "ngram"
"""The name that asks for the `NgramDrafter` where a drafter is named (`open_drafter`)."""


class DraftRequestError(Gemma4Error, ValueError):
    """A proposal was asked for with bad arguments (k out of range, bad hidden state, a
    sequence whose KV no longer holds what the drafter reads)."""


@dataclass(frozen=True)
class DraftContext:
    """One sequence to draft for: `tokens` (int32) are its tokens so far, the last of them,
    s[P], not yet run through the target, whose KV holds positions 0..P-1 (P = `kv.length`);
    `hidden` is the target's final hidden state at P-1 (float32 [n_embd], as
    `FeedResult.hidden` brings it back), for drafters that read it."""

    kv: SequenceKv
    tokens: np.ndarray
    hidden: np.ndarray | None = None

    @property
    def token(self) -> int:
        """s[P], the token the drafts follow."""
        return int(self.tokens[-1])


class Drafter(Protocol):
    """Proposes up to `k` next tokens for each of several sequences (fewer where it has no
    guess); `needs_hidden` says whether its contexts must carry the target's hidden state."""

    needs_hidden: bool

    def propose(self, contexts: Sequence[DraftContext], k: int) -> Sequence[np.ndarray]: ...


class NgramDrafter:
    """Prompt lookup: the tokens that followed an earlier occurrence of the sequence's last n
    tokens in its prompt and output so far. The longest n (from `max_ngram` down to
    `min_ngram`) whose newest occurrence is followed by k tokens wins; where none is, the
    occurrence followed by the most tokens."""

    needs_hidden = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise DraftRequestError(
                f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram} and "
                f"{max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, contexts: Sequence[DraftContext], k: int) -> list[np.ndarray]:
        """Up to `k` tokens for each context (none where its last tokens occurred nowhere
        before)."""
        return [self._lookup(np.asarray(c.tokens, dtype=np.int32), k) for c in contexts]

    def _lookup(self, tokens: np.ndarray, k: int) -> np.ndarray:
        best = np.empty(0, dtype=np.int32)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            # Windows of n tokens that start before the last n, compared with the last n.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            starts = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if not starts.size:
                continue
            full = starts[starts + n + k <= len(tokens)]
            follow = int(full[-1] if full.size else starts[0]) + n
            found = tokens[follow : follow + k]
            if len(found) == k:
                return found
            if len(found) > len(best):
                best = found
        return best


class AssistantDrafter:
    """An assistant GGUF at `path` drafting for the target model of `runner`, reading the
    runner's KV pool and computing with its backend (one computation at a time with the
    target's forward calls). Up to `max_sequences` sequences (default: the runner's n_batch)
    and `max_tokens` proposed tokens each per call."""

    needs_hidden = True

    def __init__(
        self,
        runner: ModelRunner,
        path: str | os.PathLike[str],
        max_sequences: int | None = None,
        max_tokens: int = DEFAULT_MAX_DRAFT_TOKENS,
    ) -> None:
        self.runner = runner
        self.file: AssistantFile = open_assistant(path, runner.model_file)
        self.max_sequences = runner.n_batch if max_sequences is None else max_sequences
        self.max_tokens = max_tokens
        tensors = [
            _core.TensorEntry(t.name, t.type_id, list(t.shape), t.offset, t.nbytes)
            for t in self.file.weights
        ]
        self.core = _core.Assistant(
            runner.model,
            str(self.file.gguf.path),
            tensors,
            self.file.config,
            self.max_sequences,
            max_tokens,
        )

    def propose(
        self, contexts: Sequence[DraftContext], k: int, with_logits: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """`k` proposed tokens for each context, int32 [len(contexts), k]; with `with_logits`
        also the drafter's logits of every step, float32 [len(contexts), k, vocab]."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_tokens:
            raise DraftRequestError(f"k must be an integer in 1..{self.max_tokens}, got {k!r}")
        if not 1 <= len(contexts) <= self.max_sequences:
            raise DraftRequestError(
                f"{len(contexts)} contexts: a call drafts for 1..{self.max_sequences} sequences"
            )
        width = self.file.config.n_embd_target
        if any(c.hidden is None for c in contexts):
            raise DraftRequestError("the assistant drafts from the target's hidden state")
        hidden = np.stack([np.asarray(c.hidden, dtype=np.float32) for c in contexts])
        if hidden.shape != (len(contexts), width):
            raise DraftRequestError(
                f"each context's hidden state must hold {width} values (the target's width)"
            )
        for c in contexts:
            self._check_ring(c.kv)
        table_width = max(1, max(len(c.kv.block_table) for c in contexts))
        tokens, logits = self.core.propose(
            self.runner.pool,
            np.array([c.token for c in contexts], dtype=np.int32),
            np.array([c.kv.length for c in contexts], dtype=np.int32),
            hidden,
            np.stack([c.kv.table_array(table_width) for c in contexts]),
            np.array([c.kv.ring_set for c in contexts], dtype=np.int32),
            k,
            with_logits,
        )
        return (tokens, logits) if with_logits else tokens

    def _check_ring(self, kv: SequenceKv) -> None:
        """The sequence's ring still holds the window + 1 positions before its length that the
        drafter's sliding layers read (positions written past the length since, by a rolled
        back verification, may have taken their place)."""
        if not any(layer.is_sliding for layer in self.file.config.model.layers):
            return
        pool = self.runner.pool
        oldest = max(0, kv.length - self.runner.config.sliding_window - 1)
        newest = max(kv.written_end, kv.length) - 1
        if newest // pool.block_size - oldest // pool.block_size >= pool.ring_blocks:
            raise DraftRequestError(
                f"the ring of {pool.ring_blocks} blocks no longer holds positions {oldest}.."
                f"{kv.length - 1} the drafter reads (it has taken positions up to {newest})"
            )


def open_drafter(
    draft: str | os.PathLike[str], runner: ModelRunner, max_sequences: int, max_tokens: int
) -> Drafter:
    """The drafter `draft` names for the target of `runner`: "ngram", or the path of an
    assistant GGUF (checked against the target), drafting for up to `max_sequences`
    sequences and `max_tokens` tokens at once."""
    if os.fspath(draft) == NGRAM:
        return NgramDrafter()
    return AssistantDrafter(runner, draft, max_sequences, max_tokens)
