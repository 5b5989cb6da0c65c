"""One request's continuation, token by token: sampling, end-of-generation tokens, stop strings
and the text that streams out. Model-free, in two halves the server runs in different
processes: `TokenChoice` (the token side, in the decode worker) and `TextStream` (the text
side, in a tokenizer worker); `Generation` joins them for the in-process engine."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from pygemma4.constraints import Constraint
from pygemma4.sampling import GREEDY, SampledToken, Sampler, SamplingParams
from pygemma4.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]


def room_for_tokens(n_ctx: int, n_prompt: int) -> int:
    """How many tokens may follow a prompt of `n_prompt` tokens in a context of `n_ctx`
    positions (the last token generated is never fed back, so it needs no position)."""
    return n_ctx - n_prompt + 1


@dataclass(frozen=True)
class GenerationChunk:
    """What one generated token adds: the token, the text it completes (stop strings cut
    out, characters never split), and why generation ended if it did."""

    sampled: SampledToken
    text: str
    finish_reason: FinishReason | None = None

    @property
    def token_id(self) -> int:
        """The generated token."""
        return self.sampled.token_id


class TokenStep(NamedTuple):
    """The token side of one generated token: the token, and why the continuation ends with it
    if it does."""

    sampled: SampledToken
    finish_reason: FinishReason | None

    @property
    def token_id(self) -> int:
        """The generated token."""
        return self.sampled.token_id


class StopStrings:
    """Finds the first of several stop strings in text that arrives in pieces, releasing only
    text that cannot be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to emit, and whether a stop string was found (the text before it is
        emitted; it and everything after are dropped)."""
        if not self.stops:
            return text, False
        text = self._held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        keep = max((_prefix_overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The text held back, at the end of generation."""
        text, self._held = self._held, ""
        return text


class TokenChoice:
    """The token side of a continuation: samples each next token (within a constraint's
    grammar, where the sampling parameters carry one) and ends at an end-of-generation token
    or after `max_tokens`. Unconstrained, it needs no tokenizer, so a decode worker can run it
    where only token ids travel."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_tokens: Iterable[int],
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """`tokenizer` (the model's) is needed where `sampling` is constrained: its
        vocabulary is the grammar's."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        self.max_tokens = max_tokens
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.token_ids: list[int] = []
        self._sampler = Sampler(sampling, prompt_ids)
        self._constraint: Constraint | None = None
        if sampling.constrained:
            if tokenizer is None:
                raise ValueError("constrained decoding needs the model's tokenizer")
            self._constraint = Constraint(sampling, tokenizer)

    @property
    def needs_logits(self) -> bool:
        """Whether `step` needs the logits; otherwise the most likely token, chosen where the
        model computes, can be given to `step_chosen`."""
        return self._sampler.needs_logits

    def step(self, logits: np.ndarray, draft: int | None = None) -> TokenStep:
        """The next token chosen from the logits after the last one, and why the
        continuation ends with it, if it does. `draft`, a drafter's proposal for this
        position, is kept where the sampler's rule keeps it (see `Sampler.sample`)."""
        if self._constraint is None:
            return self._advance(self._sampler.sample(logits, draft=draft))
        allowed = self._constraint.allowed(len(logits))
        sampled = self._sampler.sample(logits, allowed, draft)
        ended = self._constraint.accept(sampled.token_id)
        return self._advance(sampled, ended)

    def step_chosen(self, sampled: SampledToken) -> TokenStep:
        """Like `step`, for the most likely token already chosen (see `needs_logits`)."""
        if self.needs_logits:
            raise ValueError("these sampling parameters choose from the logits")
        self._sampler.accept(sampled.token_id)
        return self._advance(sampled)

    def _advance(self, sampled: SampledToken, grammar_ended: bool = False) -> TokenStep:
        """Record `sampled`; the continuation stops at a stop token, or at the
        end-of-generation token that ends a constraint's grammar (even where stop tokens are
        ignored)."""
        self.token_ids.append(sampled.token_id)
        if sampled.token_id in self.stop_tokens or grammar_ended:
            return TokenStep(sampled, "stop")
        if len(self.token_ids) == self.max_tokens:
            return TokenStep(sampled, "length")
        return TokenStep(sampled, None)

    @property
    def tokens_left(self) -> int:
        """How many more tokens the continuation may produce."""
        return self.max_tokens - len(self.token_ids)


class TextStream:
    """The text side of a continuation: the text each token adds, characters never split,
    cut before the first stop string; special tokens' texts are left out with `skip_special`."""

    def __init__(
        self, tokenizer: Tokenizer | None, stops: Sequence[str] = (), skip_special: bool = True
    ) -> None:
        if stops and tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer, and this file has none")
        self._text = tokenizer.stream(skip_special) if tokenizer is not None else None
        self._stops = StopStrings(stops)

    def push(
        self, token_id: int, finish_reason: FinishReason | None
    ) -> tuple[str, FinishReason | None]:
        """The text `token_id` adds, and why the continuation ends: `finish_reason` as the
        token side decided, or "stop" where the text reached a stop string. An
        end-of-generation token (`finish_reason` "stop") adds no text of its own."""
        if finish_reason == "stop":
            return self._finish(finish_reason)
        text = self._text.push(token_id) if self._text is not None else ""
        text, stopped = self._stops.push(text)
        if stopped:
            return text, "stop"
        if finish_reason == "length":
            tail, reason = self._finish(finish_reason)
            return text + tail, reason
        return text, None

    def _finish(self, reason: FinishReason) -> tuple[str, FinishReason]:
        """The text held back at the end, and `reason`, or "stop" where a stop string
        completes in that text."""
        tail, stopped = self._stops.push(self._text.finish() if self._text is not None else "")
        if stopped:
            return tail, "stop"
        return tail + self._stops.flush(), reason


class Generation:
    """The state of one continuation: feed it the logits after each token with `step`."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams | None = None,
        tokenizer: Tokenizer | None = None,
        stop_tokens: Iterable[int] | None = None,
    ) -> None:
        """`stop_tokens` of None means the tokenizer's end-of-generation tokens; stop strings
        (in `sampling.stop`) need a tokenizer."""
        sampling = GREEDY if sampling is None else sampling
        if stop_tokens is None:
            stop_tokens = tokenizer.end_of_generation_ids if tokenizer is not None else ()
        self._tokens = TokenChoice(prompt_ids, max_tokens, sampling, stop_tokens, tokenizer)
        self._text = TextStream(tokenizer, sampling.stop)
        self.finish_reason: FinishReason | None = None

    @property
    def token_ids(self) -> list[int]:
        """The tokens generated so far."""
        return self._tokens.token_ids

    @property
    def finished(self) -> bool:
        """Whether the continuation has ended."""
        return self.finish_reason is not None

    @property
    def needs_logits(self) -> bool:
        """Whether `step` needs the logits, or `step_chosen` can take the most likely token."""
        return self._tokens.needs_logits

    @property
    def tokens_left(self) -> int:
        """How many more tokens the continuation may produce (at most)."""
        return 0 if self.finished else self._tokens.tokens_left

    def step(self, logits: np.ndarray, draft: int | None = None) -> GenerationChunk:
        """Choose the next token from the model's logits after the last token (keeping a
        drafter's proposal `draft` where the sampler's rule keeps it)."""
        if self.finished:
            raise RuntimeError("generation has already finished")
        return self._emit(*self._tokens.step(logits, draft))

    def step_chosen(self, sampled: SampledToken) -> GenerationChunk:
        """Continue with the most likely token, chosen where the model computes."""
        if self.finished:
            raise RuntimeError("generation has already finished")
        return self._emit(*self._tokens.step_chosen(sampled))

    def _emit(self, sampled: SampledToken, token_reason: FinishReason | None) -> GenerationChunk:
        text, reason = self._text.push(sampled.token_id, token_reason)
        self.finish_reason = reason
        return GenerationChunk(sampled, text, reason)


def _prefix_overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
