"""Speculative decoding as the engine and the decode worker run it: a drafter proposes the next
tokens of each sequence, one target step verifies them all (a feed of the sequence's next token
followed by the drafts), the sequence keeps the tokens the target itself would have chosen
(`runner.next_tokens`) and its KV is rolled back past the rest. Greedy output is unchanged
token for token, and sampled output keeps the target's distribution exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pygemma4.drafter import DraftContext, Drafter, open_drafter
from pygemma4.errors import Gemma4Error
from pygemma4.kv import SequenceKv
from pygemma4.protocol import SpeculationCounts
from pygemma4.runner import ChosenStep, Feed, ModelRunner

DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16


class DraftSettingsError(Gemma4Error, ValueError):
    """Drafting was asked for with settings that cannot work (k out of range)."""


@dataclass
class SpeculationStats:
    """What drafting proposed and what verification kept, in all and per draft position
    (position 0 is the first token after the one the drafts follow)."""

    steps: int = 0
    """Verification steps that carried drafts."""
    proposed: int = 0
    accepted: int = 0
    proposed_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    """Time spent drafting (the drafter's calls)."""

    def record(self, proposed: int, accepted: int) -> None:
        """Count one verification of `proposed` drafts of which the first `accepted` were
        kept."""
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        grow = proposed - len(self.proposed_at)
        if grow > 0:
            self.proposed_at += [0] * grow
            self.accepted_at += [0] * grow
        for position in range(proposed):
            self.proposed_at[position] += 1
            self.accepted_at[position] += position < accepted

    @property
    def acceptance_rate(self) -> float:
        """The share of proposed tokens kept (0 before any)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def acceptance_per_position(self) -> list[float]:
        """For each draft position, the share of proposals there that were kept."""
        return [
            a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at, strict=True)
        ]

    def counts(self) -> SpeculationCounts:
        """The counts as the protocol carries them."""
        return SpeculationCounts(
            steps=self.steps,
            proposed=self.proposed,
            accepted=self.accepted,
            proposed_at=list(self.proposed_at),
            accepted_at=list(self.accepted_at),
        )

    def to_dict(self) -> dict[str, Any]:
        """The counts and rates, as plain data."""
        return {
            "steps": self.steps,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_per_position": self.acceptance_per_position(),
            "draft_seconds": self.draft_seconds,
        }


def check_draft_tokens(draft_tokens: int, n_batch: int) -> None:
    """DraftSettingsError unless 1 <= draft_tokens <= MAX_DRAFT_TOKENS and a verification
    (the drafts and the token before them) fits a forward call of `n_batch` tokens."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int):
        raise DraftSettingsError(f"draft tokens must be an integer, got {draft_tokens!r}")
    if not 1 <= draft_tokens <= min(MAX_DRAFT_TOKENS, n_batch - 1):
        raise DraftSettingsError(
            f"draft tokens must be in 1..{min(MAX_DRAFT_TOKENS, n_batch - 1)} (at most "
            f"{MAX_DRAFT_TOKENS}, and with the token before them within a step of {n_batch}), "
            f"got {draft_tokens}"
        )


class Speculator:
    """A drafter, how many tokens it drafts per step, and the statistics of what was kept."""

    def __init__(self, drafter: Drafter, draft_tokens: int) -> None:
        self.drafter = drafter
        self.draft_tokens = draft_tokens
        self.stats = SpeculationStats()

    @classmethod
    def open(
        cls,
        draft: str | os.PathLike[str],
        draft_tokens: int,
        runner: ModelRunner,
        max_sequences: int,
    ) -> Speculator:
        """Drafting with `draft` ("ngram" or an assistant GGUF) for the target of `runner`,
        `draft_tokens` per step, for up to `max_sequences` sequences at once."""
        check_draft_tokens(draft_tokens, runner.n_batch)
        return cls(open_drafter(draft, runner, max_sequences, draft_tokens), draft_tokens)

    def propose(self, contexts: Sequence[DraftContext], limits: Sequence[int]) -> list[np.ndarray]:
        """Drafts for each context, at most `draft_tokens` and its limit (0: none); a context
        without the hidden state a drafter needs gets none."""
        wanted = [
            i
            for i, (context, limit) in enumerate(zip(contexts, limits, strict=True))
            if limit > 0 and (context.hidden is not None or not self.drafter.needs_hidden)
        ]
        drafts = [np.empty(0, dtype=np.int32) for _ in contexts]
        if not wanted:
            return drafts
        k = min(self.draft_tokens, max(limits[i] for i in wanted))
        start = time.perf_counter()
        proposals = self.drafter.propose([contexts[i] for i in wanted], k)
        self.stats.draft_seconds += time.perf_counter() - start
        for i, proposal in zip(wanted, proposals, strict=True):
            drafts[i] = np.asarray(proposal[: limits[i]], dtype=np.int32)
        return drafts

    @property
    def needs_hidden(self) -> bool:
        """Whether verification feeds must bring back the target's hidden states."""
        return self.drafter.needs_hidden

    def settle(
        self,
        runner: ModelRunner,
        kv: SequenceKv,
        drafts: np.ndarray,
        steps: Sequence[ChosenStep],
    ) -> int:
        """After the verification feed: count the drafts kept (the first `accepted`), roll the
        sequence back to the positions whose tokens stand, and return `accepted`."""
        accepted = 0
        for draft, step in zip(drafts, steps, strict=False):  # steps end at a rejection
            if step.token_id != int(draft):
                break
            accepted += 1
        if len(drafts):
            self.stats.record(len(drafts), accepted)
        if accepted < len(drafts):
            runner.rollback(kv, kv.length - (len(drafts) - accepted))
        return accepted


def verification_feed(
    kv: SequenceKv, token: int, drafts: np.ndarray, greedy: bool, hidden: bool
) -> Feed:
    """`token` followed by `drafts` (none without drafting), an output for each (just the
    last without drafts), with the hidden states where `hidden`."""
    tokens = np.concatenate([np.array([token], dtype=np.int32), drafts.astype(np.int32)])
    return Feed(kv, tokens, "all" if len(drafts) else "last", greedy, hidden)
