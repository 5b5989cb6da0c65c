"""One forward step, assembled once: the batch the core runs, and the runner that runs it.

The engine and the server's decode worker both compute through a `ModelRunner`: it
owns the core's model and the KV pool it writes, turns `Feed`s (tokens to append to one
sequence, and which outputs to bring back) into one `ForwardBatch`, runs it and hands each feed
its outputs. A sequence's place in the pool and its length are its `SequenceKv`; the runner
advances the length as it writes, and rolls it back on request.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import numpy as np

from pygemma4 import _core
from pygemma4.config import ModelFile
from pygemma4.errors import Gemma4Error
from pygemma4.kv import SequenceKv
from pygemma4.sampling import SampledToken

BACKENDS = ("cpu", "cuda")

Outputs = Literal["none", "last", "all"]
"""Which of a feed's rows bring back an output: none, the last, or every one."""


class BackendUnavailableError(Gemma4Error, RuntimeError):
    """The backend asked for cannot run here (no CUDA in this build, no driver, no device)."""


class RollbackError(Gemma4Error, ValueError):
    """A sequence cannot be rolled back to the length asked for."""


class SpansUnsupportedError(Gemma4Error, ValueError):
    """The backend cannot attend an image's soft tokens to each other in both directions
    (the unified models' images): CUDA's attention kernels do not take spans yet."""


class SpanSplitError(Gemma4Error, ValueError):
    """The soft tokens of an image that attend to each other in both directions would be cut
    between forward calls (each image is computed in one call)."""


# Why each image is computed whole in one call rather than its rows reading across calls: a
# row reads the keys of the image's later rows, which only a call that holds them has written,
# and on sliding layers its earlier rows lie beyond the window, where only the call's own
# positions are sure to be still in the ring. So the chunkers (`prefill`, `next_prefill`) never
# cut a span, and the prefix cache never resumes a sequence inside one.


def default_threads() -> int:
    """The number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without affinity masks
        return os.cpu_count() or 1


def check_backend(backend: str, device: int = 0) -> None:
    """Raise ValueError for an unknown backend name or device number, and
    BackendUnavailableError, saying why, where the backend cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise ValueError(f"device must be an integer >= 0, got {device!r}")
    if backend == "cuda":
        reason = _core.cuda_unavailable_reason(device)
        if reason:
            raise BackendUnavailableError(f"CUDA is unavailable: {reason}")


def pool_device(backend: str, device: int) -> int:
    """Where a KV pool for a model on `backend` lives: the CUDA device, or -1 for host memory."""
    return device if backend == "cuda" else -1


def load_core_model(
    model_file: ModelFile, n_batch: int, threads: int, backend: str = "cpu", device: int = 0
) -> _core.Model:
    """The core's model over a validated file, for calls of up to `n_batch` tokens, computed
    on `backend` (by `threads` threads on the CPU; on CUDA device `device`)."""
    check_backend(backend, device)
    tensors = [
        _core.TensorEntry(t.name, t.type_id, list(t.shape), t.offset, t.nbytes)
        for t in model_file.gguf.tensors.values()
    ]
    return _core.Model(
        str(model_file.gguf.path), tensors, model_file.config, n_batch, threads, backend, device
    )


def _no_spans() -> np.ndarray:
    return np.empty((0, 2), dtype=np.int32)


@dataclass(frozen=True)
class Embeddings:
    """Rows that take given embeddings in place of their tokens' (an image's soft tokens):
    `offsets` int32 [m], rows of a feed counted from its first, take the rows of `rows`
    float32 [m, n_embd]. `spans` int32 [k, 2]: the (first, stop) rows, counted the same way,
    of each image whose soft tokens attend to each other in both directions."""

    offsets: np.ndarray
    rows: np.ndarray
    spans: np.ndarray = field(default_factory=_no_spans)

    def window(self, start: int, stop: int) -> Embeddings | None:
        """Those of rows [start, stop), counted from `start`; None where there are none.
        SpanSplitError where the window cuts a span."""
        for first, end in self.spans:
            if first < start < end or first < stop < end:
                raise SpanSplitError(
                    f"rows {start}..{stop - 1} of a prompt cut the image at rows "
                    f"{first}..{end - 1}, whose soft tokens attend to each other in one call"
                )
        inside = (self.offsets >= start) & (self.offsets < stop)
        if not inside.any():
            return None
        spans = self.spans[(self.spans[:, 0] >= start) & (self.spans[:, 1] <= stop)] - start
        return Embeddings(
            (self.offsets[inside] - start).astype(np.int32),
            self.rows[inside],
            spans.astype(np.int32).reshape(-1, 2),
        )


def uncut_length(spans: np.ndarray, length: int) -> int:
    """The longest first part, of at most `length` rows, of rows holding `spans` ((first,
    stop) rows) that cuts none of them."""
    for first, stop in spans:
        if first < length < stop:
            return int(first)
    return length


@dataclass(frozen=True)
class Feed:
    """Tokens (int32, already checked) to append to one sequence in a forward call, and which
    of their rows bring back an output. With `greedy`, an output is the most likely token and
    its log-probability instead of the logits, where the runner can choose it where the model
    computes (see `ModelRunner.chooses_on_device`). With `hidden`, each output row also brings
    back the model's final hidden state (what an assistant drafter continues from)."""

    kv: SequenceKv
    tokens: np.ndarray
    outputs: Outputs = "last"
    greedy: bool = False
    hidden: bool = False
    embeddings: Embeddings | None = None

    def output_offsets(self) -> np.ndarray:
        """The rows of the feed, counted from its first, that bring back an output."""
        if self.outputs == "all":
            return np.arange(len(self.tokens), dtype=np.int32)
        if self.outputs == "last":
            return np.array([len(self.tokens) - 1], dtype=np.int32)
        return np.empty(0, dtype=np.int32)


@dataclass
class FeedResult:
    """The outputs of one feed, a row each: logits float32 [rows, vocab], or where the token
    was chosen on the device, `tokens` int32 [rows] and their `logprobs`; for a feed that asked
    for it, `hidden` float32 [rows, n_embd], the final hidden state (after the output norm,
    before the head)."""

    logits: np.ndarray | None = None
    tokens: np.ndarray | None = None
    logprobs: np.ndarray | None = None
    hidden: np.ndarray | None = None

    def chosen(self, row: int = -1) -> SampledToken:
        """The token chosen on the device for output `row`."""
        if self.tokens is None or self.logprobs is None:
            raise ValueError("no token was chosen on the device for this feed")
        return SampledToken(int(self.tokens[row]), float(self.logprobs[row]), ())


class ChosenStep(Protocol):
    """What a token chooser gives for each token: the token, and why the continuation ends
    with it (None while it goes on)."""

    @property
    def token_id(self) -> int: ...

    @property
    def finish_reason(self) -> str | None: ...


Step = TypeVar("Step", bound=ChosenStep, covariant=True)


class TokenChooser(Protocol[Step]):
    """What picks a sequence's next token: from the logits (keeping a drafter's proposal where
    its rule keeps it), or from the device's choice."""

    def step(self, logits: np.ndarray, draft: int | None = None) -> Step: ...

    def step_chosen(self, sampled: SampledToken) -> Step: ...


def next_tokens(
    result: FeedResult, chooser: TokenChooser[Step], drafts: Sequence[int] = ()
) -> list[Step]:
    """`chooser`'s steps on the outputs of a feed of a token followed by `drafts` (one output
    row each; without drafts, the feed's last output): row j's step keeps draft j where the
    chooser keeps it. The steps end at the first draft not kept (the chooser's own token in
    its place), after the row that follows the last draft, or where the continuation ends; so
    the tokens are those the chooser would have given one step at a time."""
    chosen = result.tokens if result.tokens is not None else result.logits
    assert chosen is not None  # every feed brings back one or the other
    first = len(chosen) - 1 - len(drafts)
    steps = []
    for offset in range(len(drafts) + 1):
        draft = int(drafts[offset]) if offset < len(drafts) else None
        if result.tokens is not None:
            step = chooser.step_chosen(result.chosen(first + offset))
        else:
            step = chooser.step(chosen[first + offset], draft)
        steps.append(step)
        if step.finish_reason is not None or step.token_id != draft:
            break
    return steps


@dataclass(frozen=True)
class ForwardBatch:
    """One forward call of the core, as int32 arrays: row i is tokens[i] at positions[i] of the
    call's sequence seqs[i], whose full-attention KV lives in the blocks of block_tables[seqs[i]]
    ([n_seq, width], -1 for none) and sliding KV in ring set ring_sets[seqs[i]]. The logits of
    `logit_rows` come back, of `argmax_rows` only the most likely token, and of `hidden_rows`
    the final hidden state. `span_first` and `span_last` are empty, or give each row the first
    and last position of the span of positions it attends to in both directions (an image's
    soft tokens; its own position for a row in none)."""

    tokens: np.ndarray
    positions: np.ndarray
    seqs: np.ndarray
    block_tables: np.ndarray
    ring_sets: np.ndarray
    logit_rows: np.ndarray
    argmax_rows: np.ndarray
    hidden_rows: np.ndarray
    embedding_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    embeddings: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))
    span_first: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    span_last: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))

    @classmethod
    def of(cls, feeds: Sequence[Feed], greedy_on_device: bool) -> ForwardBatch:
        """The call that appends each feed's tokens to its sequence at the sequence's length
        (feeds of one sequence may not share a call). Greedy feeds' outputs are argmax rows
        where `greedy_on_device`, logit rows otherwise."""
        if len({id(feed.kv) for feed in feeds}) != len(feeds):
            raise ValueError("a sequence appears twice in one forward call")
        width = max(len(feed.kv.block_table) for feed in feeds)
        first_rows = np.cumsum([0] + [len(feed.tokens) for feed in feeds[:-1]], dtype=np.int32)
        logit_rows, argmax_rows, hidden_rows = [], [], []
        embedding_rows, embeddings = [], []
        for first, feed in zip(first_rows, feeds, strict=True):
            rows = first + feed.output_offsets()
            (argmax_rows if feed.greedy and greedy_on_device else logit_rows).append(rows)
            if feed.hidden:
                hidden_rows.append(rows)
            if feed.embeddings is not None:
                embedding_rows.append(first + feed.embeddings.offsets)
                embeddings.append(feed.embeddings.rows)
        empty = np.empty(0, dtype=np.int32)
        positions = np.concatenate(
            [
                np.arange(feed.kv.length, feed.kv.length + len(feed.tokens), dtype=np.int32)
                for feed in feeds
            ]
        )
        span_first, span_last = empty, empty
        if any(feed.embeddings is not None and len(feed.embeddings.spans) for feed in feeds):
            span_first, span_last = positions.copy(), positions.copy()
            for first, feed in zip(first_rows, feeds, strict=True):
                for start, stop in [] if feed.embeddings is None else feed.embeddings.spans:
                    rows = slice(first + start, first + stop)
                    span_first[rows] = positions[first + start]
                    span_last[rows] = positions[first + stop - 1]
        return cls(
            tokens=np.concatenate([feed.tokens for feed in feeds]).astype(np.int32, copy=False),
            positions=positions,
            seqs=np.repeat(np.arange(len(feeds), dtype=np.int32), [len(f.tokens) for f in feeds]),
            block_tables=np.stack([feed.kv.table_array(width) for feed in feeds]),
            ring_sets=np.array([feed.kv.ring_set for feed in feeds], dtype=np.int32),
            logit_rows=np.concatenate([empty, *logit_rows]),
            argmax_rows=np.concatenate([empty, *argmax_rows]),
            hidden_rows=np.concatenate([empty, *hidden_rows]),
            embedding_rows=np.concatenate([empty, *embedding_rows]).astype(np.int32),
            embeddings=(
                np.concatenate(embeddings).astype(np.float32, copy=False)
                if embeddings
                else np.empty((0, 0), dtype=np.float32)
            ),
            span_first=span_first,
            span_last=span_last,
        )


class ModelRunner:
    """The core's model and the KV pool it computes in: forward calls over many sequences.

    `n_batch` bounds the tokens of one call. Where `chooses_on_device` (by default on CUDA), the
    most likely token of a greedy feed is chosen where the model computes, so its logits never
    cross to the host; on the CPU they are read anyway, and the sampler's own arithmetic keeps
    choosing.
    """

    def __init__(
        self,
        model_file: ModelFile,
        pool: _core.KvPool,
        n_batch: int,
        threads: int,
        backend: str = "cpu",
        device: int = 0,
        chooses_on_device: bool | None = None,
    ) -> None:
        self.model_file = model_file
        self.config = model_file.config
        self.model = load_core_model(model_file, n_batch, threads, backend, device)
        self.backend = backend
        self.pool = pool
        self.n_batch = n_batch
        self.chooses_on_device = (
            backend == "cuda" if chooses_on_device is None else chooses_on_device
        )

    def forward(self, feeds: Sequence[Feed]) -> list[FeedResult]:
        """One call (of at most `n_batch` tokens) appending every feed's tokens to its
        sequence; each feed's outputs. The sequences grow only when the call succeeds
        (ValueError from the core, writing nothing, when it refuses the call)."""
        for feed in feeds:
            feed.kv.ensure(feed.kv.length + len(feed.tokens))
        batch = ForwardBatch.of(feeds, self.chooses_on_device)
        if len(batch.span_first) and not self.model.attends_spans:
            raise SpansUnsupportedError(
                f"the {self.backend} backend cannot attend an image's soft tokens to each other "
                "in both directions, as the unified Gemma 4 models' images need: compute them "
                "with backend='cpu'"
            )
        logits, tokens, logprobs, hidden = self.model.forward(self.pool, batch)
        results, logit_at, argmax_at, hidden_at = [], 0, 0, 0
        for feed in feeds:
            n = len(feed.output_offsets())
            if feed.greedy and self.chooses_on_device:
                span = slice(argmax_at, argmax_at + n)
                result = FeedResult(tokens=tokens[span], logprobs=logprobs[span])
                argmax_at += n
            else:
                result = FeedResult(logits=logits[logit_at : logit_at + n])
                logit_at += n
            if feed.hidden:
                result.hidden = hidden[hidden_at : hidden_at + n]
                hidden_at += n
            results.append(result)
            feed.kv.advance(len(feed.tokens))
        return results

    def next_prefill(
        self,
        pending: Sequence[tuple[SequenceKv, np.ndarray]],
        budget: int | None = None,
        spans: Sequence[np.ndarray] | None = None,
    ) -> list[Feed]:
        """The feeds of the next prefill call: the first `budget` (by default `n_batch`)
        tokens of the pending prompts, oldest first (a long prompt is cut into chunks, several
        short ones share a call), bringing back no output. A feed for each prompt the call
        reaches. `spans` (for each prompt, (first, stop) rows of its tokens) are never cut: a
        prompt whose next span does not fit what is left waits for the next call
        (SpanSplitError where one does not fit a whole budget)."""
        feeds: list[Feed] = []
        full = budget = self.n_batch if budget is None else budget
        for i, (kv, tokens) in enumerate(pending):
            if budget == 0:
                break
            take = min(budget, len(tokens))
            if spans is not None and len(tokens) > 0:
                take = uncut_length(spans[i], take)
                if take == 0 and budget == full:
                    raise SpanSplitError(
                        f"an image whose soft tokens attend to each other is longer than a "
                        f"prefill call of {full} tokens"
                    )
                if take == 0:
                    break
            feeds.append(Feed(kv, tokens[:take], "none"))
            budget -= take
        return feeds

    def prefill(self, feed: Feed) -> FeedResult:
        """A feed of any length, in chunks of at most `n_batch` tokens, none cutting an image
        whose soft tokens attend to each other (SpanSplitError for one longer than n_batch);
        the outputs of all of them."""
        results = []
        spans = _no_spans() if feed.embeddings is None else feed.embeddings.spans
        first = 0
        while first < len(feed.tokens):
            length = uncut_length(spans - first, min(self.n_batch, len(feed.tokens) - first))
            if length == 0:
                raise SpanSplitError(
                    f"an image whose soft tokens attend to each other is longer than a call "
                    f"of n_batch {self.n_batch} tokens"
                )
            chunk = feed.tokens[first : first + length]
            last_chunk = first + len(chunk) == len(feed.tokens)
            outputs = feed.outputs if feed.outputs == "all" or last_chunk else "none"
            given = (
                None
                if feed.embeddings is None
                else feed.embeddings.window(first, first + len(chunk))
            )
            chunk_feed = Feed(feed.kv, chunk, outputs, feed.greedy, feed.hidden, given)
            results.append(self.forward([chunk_feed])[0])
            first += length
        if not results:
            return FeedResult(logits=np.empty((0, self.config.vocab_size), dtype=np.float32))
        return _concatenate(results)

    def decode(self, feeds: Sequence[Feed]) -> list[FeedResult]:
        """One step for many sequences: each feed (one token, or several to verify at once) in
        calls of at most `n_batch` tokens, a feed never split; each feed's outputs."""
        results: list[FeedResult] = []
        call: list[Feed] = []
        for feed in feeds:
            if len(feed.tokens) > self.n_batch:
                raise ValueError(
                    f"a decode feed of {len(feed.tokens)} tokens exceeds n_batch {self.n_batch}"
                )
            if call and sum(len(f.tokens) for f in call) + len(feed.tokens) > self.n_batch:
                results += self.forward(call)
                call = []
            call.append(feed)
        if call:
            results += self.forward(call)
        return results

    def rollback(self, kv: SequenceKv, length: int) -> None:
        """Forget every position of a sequence from `length` on, so that the next tokens
        appended continue from there (its blocks stay reserved). RollbackError when the
        sliding-window rings no longer hold the window before `length`: positions written
        since have taken their place."""
        if not 0 <= length <= kv.length:
            raise RollbackError(f"cannot roll a sequence of {kv.length} positions back to {length}")
        if any(layer.is_sliding and layer.has_kv for layer in self.config.layers):
            block_size, ring_blocks = self.pool.block_size, self.pool.ring_blocks
            oldest_needed = max(0, length - self.config.sliding_window + 1)
            newest_written = kv.written_end - 1
            if length > 0 and newest_written // block_size - oldest_needed // block_size >= (
                ring_blocks
            ):
                raise RollbackError(
                    f"cannot roll back to {length} positions: the ring of {ring_blocks} blocks "
                    f"has since taken positions up to {newest_written} in place of the "
                    f"window's from {oldest_needed}"
                )
        kv.length = length


def _concatenate(results: Sequence[FeedResult]) -> FeedResult:
    """The outputs of consecutive chunks of one feed, as one result."""

    def joined(parts: list[np.ndarray | None]) -> np.ndarray | None:
        present = [p for p in parts if p is not None]
        return np.concatenate(present) if present else None

    return FeedResult(
        logits=joined([r.logits for r in results]),
        tokens=joined([r.tokens for r in results]),
        logprobs=joined([r.logprobs for r in results]),
        hidden=joined([r.hidden for r in results]),
    )
