"""The Gemma 4 assistant drafter: proposes the next tokens of many sequences at once from the
target's final hidden state and KV, for speculative decoding (see `assistant_config`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pygemma4 import _core
from pygemma4.assistant_config import AssistantFile, open_assistant
from pygemma4.errors import Gemma4Error
from pygemma4.kv import SequenceKv
from pygemma4.runner import ModelRunner

DEFAULT_MAX_DRAFT_TOKENS = 8


class DraftRequestError(Gemma4Error, ValueError):
    """A proposal was asked for with bad arguments (k out of range, bad hidden state, a
    sequence whose KV no longer holds what the drafter reads)."""


@dataclass(frozen=True)
class DraftRequest:
    """One sequence to draft for: its KV holds positions 0..P-1 (P = `kv.length`), `token` is
    its newest token s[P] (not yet run through the target), `hidden` the target's final hidden
    state at P-1 (float32 [n_embd], as `FeedResult.hidden` brings it back)."""

    kv: SequenceKv
    token: int
    hidden: np.ndarray


class AssistantDrafter:
    """An assistant GGUF at `path` drafting for the target model of `runner`, reading the
    runner's KV pool and computing with its backend (one computation at a time with the
    target's forward calls). Up to `max_sequences` sequences (default: the runner's n_batch)
    and `max_tokens` proposed tokens each per call."""

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
            for t in self.file.gguf.tensors.values()
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
        self, requests: Sequence[DraftRequest], k: int, with_logits: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """`k` proposed tokens for each request, int32 [len(requests), k]; with `with_logits`
        also the drafter's logits of every step, float32 [len(requests), k, vocab]."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_tokens:
            raise DraftRequestError(f"k must be an integer in 1..{self.max_tokens}, got {k!r}")
        if not 1 <= len(requests) <= self.max_sequences:
            raise DraftRequestError(
                f"{len(requests)} requests: a call drafts for 1..{self.max_sequences} sequences"
            )
        width = self.file.config.n_embd_target
        hidden = np.stack([np.asarray(r.hidden, dtype=np.float32) for r in requests])
        if hidden.shape != (len(requests), width):
            raise DraftRequestError(
                f"each request's hidden state must hold {width} values (the target's width)"
            )
        for r in requests:
            self._check_ring(r.kv)
        table_width = max(1, max(len(r.kv.block_table) for r in requests))
        tokens, logits = self.core.propose(
            self.runner.pool,
            np.array([r.token for r in requests], dtype=np.int32),
            np.array([r.kv.length for r in requests], dtype=np.int32),
            hidden,
            np.stack([r.kv.table_array(table_width) for r in requests]),
            np.array([r.kv.ring_set for r in requests], dtype=np.int32),
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
