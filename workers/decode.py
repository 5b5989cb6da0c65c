"""The decode worker: owner of the KV pool and of every computation of the model, and
scheduler of every request.

Requests wait in arrival order until a batch place and the KV blocks for their prompt are free
(taking what the prefix cache holds of it); a sequence then grows block by block as it
generates. When a step finds the pool short, the youngest sequences are paused (their KV left
in the prefix cache) and wait at the head of the queue, to resume where they stopped: none
fails, and no sequence can touch another's blocks.

Each step is one forward call that carries every running sequence's next token and up to
`prefill_chunk` tokens of the prompts being prefilled, oldest first. One process thus computes
everything on all the threads it was given: an idle server prefills on the whole machine, and
under load the decode tokens ride along with the prompt chunks (the weights read once for
both), with no second process contending for the cores. A prompt is prefilled but its last
token, which is the sequence's first decode step and yields the first logits. The step samples
each running sequence's next token, sends the tokens to the tokenizer workers and retires the
sequences that ended. With a drafter, each sequence's step also carries its drafts, verified
together: a sequence may gain several tokens in one step (`pygemma4.speculative`).

A prompt's images and clips are encoded on a thread of their own while the loop goes on
stepping the other sequences (the towers release the GIL): a new image delays its own request,
never the streams already running. The sequence holds its batch place and its KV meanwhile.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

import numpy as np

from pygemma4 import protocol
from pygemma4.constraints import ConstraintError, grammar_vocabulary
from pygemma4.drafter import DraftContext
from pygemma4.errors import Gemma4Error
from pygemma4.generation import TokenChoice
from pygemma4.kv import BlockAllocator, SequenceKv
from pygemma4.media.encoders import MediaEncoders
from pygemma4.media.kinds import PreparedMedia
from pygemma4.multimodal import PlacedMedia, Prompt, media_pad_id, model_tokens
from pygemma4.prefix_cache import MediaKey, PrefixCache
from pygemma4.protocol import (
    DecodeLoad,
    EndedRequests,
    RequestFailure,
    StepTokens,
    TokenizedRequest,
    TokenOutput,
)
from pygemma4.runner import Embeddings, Feed, FeedResult, next_tokens
from pygemma4.speculative import Speculator, verification_feed
from pygemma4.tokenizer import Tokenizer
from pygemma4.workers.runtime import (
    POLL_MS,
    ServerConfig,
    Worker,
    kv_layout,
    prepared_media,
    run_worker,
    shared_pool_runner,
)


@dataclass
class Sequence:
    """A request the decode worker has admitted (and, paused, will resume)."""

    request: TokenizedRequest
    kv: SequenceKv
    choice: TokenChoice
    next_token: int = 0
    """The token the next step feeds."""
    unwritten: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    """While it is prefilled: the tokens still to write before `next_token`."""
    hidden: np.ndarray | None = None
    """The target's final hidden state before `next_token` (what an assistant drafts from),
    once a step brought it back."""
    cached_tokens: int = 0
    """Prompt tokens the prefix cache held (told with the first token)."""
    media: tuple[tuple[int, PreparedMedia], ...] = ()
    """The prompt's images and clips, as their towers read them, at the offsets of their
    soft tokens."""
    encoded: dict[int, np.ndarray] = field(default_factory=dict)
    """The embeddings of the media encoded so far, by offset (those the prefix cache held
    whole need none)."""
    embeddings: Embeddings | None = None
    """The rows of those embeddings, at their positions in the prompt."""

    @property
    def rid(self) -> int:
        """Its request's id."""
        return self.request.rid

    def tokens(self) -> np.ndarray:
        """The prompt and the tokens generated so far."""
        generated = np.asarray(self.choice.token_ids, dtype=np.int32)
        return np.concatenate([np.asarray(self.request.prompt_ids, dtype=np.int32), generated])

    def media_keys(self) -> tuple[MediaKey, ...]:
        """What the prefix cache names its media's positions by."""
        return tuple(
            MediaKey(offset, m.n_tokens, m.digest, m.bidirectional) for offset, m in self.media
        )

    def with_media(self, feed: Feed) -> Feed:
        """`feed` (of this sequence's prompt) with the embeddings of the media rows it holds."""
        if self.embeddings is None:
            return feed
        start = feed.kv.length
        rows = self.embeddings.window(start, start + len(feed.tokens))
        return dataclasses.replace(feed, embeddings=rows)

    def unwritten_spans(self) -> np.ndarray:
        """The (first, stop) rows of `unwritten` of each image whose soft tokens attend to
        each other, which one call computes whole."""
        if self.embeddings is None:
            return np.empty((0, 2), dtype=np.int32)
        return self.embeddings.spans - self.kv.length

    def draft_context(self) -> DraftContext:
        """What a drafter reads of this sequence."""
        return DraftContext(self.kv, self.tokens(), self.hidden)

    def draft_limit(self) -> int:
        """How many tokens may be drafted for it now: none where it opted out, and never past
        its last token (which is never fed)."""
        return self.choice.tokens_left - 1 if self.request.speculative else 0


@dataclass
class Encoding:
    """A sequence given its KV whose media are being encoded, to start from `tokens` (the
    prefix cache held the first `cached`) once `embeddings` (by offset) are done."""

    sequence: Sequence
    tokens: np.ndarray
    cached: int
    embeddings: Future[dict[int, np.ndarray]]


# How often the loop looks for finished encodings while nothing else runs: a few ms added to
# the request's first token, against a core kept busy by polling faster.
ENCODING_POLL_MS = 5


class DecodeWorker(Worker):
    """Schedules, batches and decodes."""

    def __init__(self, config: ServerConfig, name: str, epoch: int) -> None:
        super().__init__(config, name, ["frontend", *config.tokenizer_names()])
        # A step feeds every running sequence its next token and its drafts, and a chunk of
        # the prompts being prefilled.
        tokens_per_sequence = 1 + (config.draft_tokens if config.draft is not None else 0)
        self.runner = shared_pool_runner(
            config, config.max_batch * tokens_per_sequence + config.prefill_chunk, config.threads
        )
        # Made before the target's first step (on CUDA the step is captured once).
        self.speculator = (
            None
            if config.draft is None
            else Speculator.open(config.draft, config.draft_tokens, self.runner, config.max_batch)
        )
        self.media = (
            None
            if config.mmproj is None
            else MediaEncoders(
                config.mmproj,
                self.runner.model_file,
                config.max_image_tokens,
                config.threads,
                config.backend,
                config.device,
            )
        )
        """The projector's towers, which encode the images and clips of prompts."""
        self.encoding: dict[int, Encoding] = {}
        """Sequences whose media are being encoded, in the order they started."""
        self.encode_jobs: SimpleQueue[tuple[list[tuple[int, PreparedMedia]], Future[Any]]]
        self.encode_jobs = SimpleQueue()
        if self.media is not None:
            # A daemon: the towers are not made to run twice at once, and exit never waits
            # for an image.
            threading.Thread(target=self.encode_in_turn, name="media-encoder", daemon=True).start()
        self.pad_id = media_pad_id(self.runner.model_file.gguf.metadata)
        self.layout = kv_layout(config.kv)
        self.allocator = BlockAllocator(self.layout)
        self.prefix_cache = PrefixCache(
            self.allocator, self.runner.pool, self.runner.config, config.prefix_snapshots
        )
        self.waiting: deque[TokenizedRequest | Sequence] = deque()
        """New requests, and paused sequences (at the head), in the order they start."""
        self.prefilling: dict[int, Sequence] = {}
        """Sequences whose prompts are being written, oldest first."""
        self.running: dict[int, Sequence] = {}
        self.reported = DecodeLoad(kv_blocks_used=0, kv_blocks_total=self.layout.n_blocks)
        # A real model's grammar vocabulary takes seconds to build: it is built off the decode
        # loop from the start (llguidance releases the GIL meanwhile), so that the first
        # constrained request does not stall every running sequence.
        self._grammar_tokenizer: Tokenizer | Exception | None = None
        self._grammar_vocabulary = threading.Thread(
            target=self._build_grammar_vocabulary, name="grammar-vocabulary", daemon=True
        )
        self._grammar_vocabulary.start()

    def _build_grammar_vocabulary(self) -> None:
        try:
            tokenizer = Tokenizer.from_metadata(self.runner.model_file.gguf.metadata)
            grammar_vocabulary(tokenizer)
        except Exception as e:  # said to each constrained request, never fatal to the worker
            self._grammar_tokenizer = e
            return
        self._grammar_tokenizer = tokenizer

    @property
    def grammar_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, its grammar vocabulary built (waiting for that where it is
        still being built); ConstraintError where it cannot be built (a file without one)."""
        self._grammar_vocabulary.join()
        built = self._grammar_tokenizer
        if not isinstance(built, Tokenizer):
            raise ConstraintError(f"constrained decoding is unavailable: {built}")
        return built

    def wait_ms(self) -> int:
        """No wait while sequences are running or being prefilled (the loop then steps), a
        short one while media are being encoded."""
        if self.running or self.prefilling:
            return 0
        return ENCODING_POLL_MS if self.encoding else POLL_MS

    def work(self) -> None:
        """Start the sequences whose media are encoded, admit what fits, then compute one
        step; tell the front end when the KV held changed."""
        self.start_encoded()
        self.admit()
        if self.running or self.prefilling:
            self.step()
        self.report_load()

    def report_load(self) -> None:
        """Send the front end the KV blocks held and the drafting counts, when they changed
        since it was last told."""
        load = DecodeLoad(
            kv_blocks_used=self.layout.n_blocks - self.allocator.free_blocks,
            kv_blocks_total=self.layout.n_blocks,
            speculation=None if self.speculator is None else self.speculator.stats.counts(),
            prefix_looked_up=self.prefix_cache.stats.looked_up,
            prefix_hit=self.prefix_cache.stats.hit,
        )
        if load != self.reported:
            self.reported = load
            self.mail.send("frontend", load)

    def queue(self, request: TokenizedRequest) -> None:
        """Queue a request to be admitted when it fits, unless the prompt tokens waiting
        would pass the server's limit."""
        most = self.config.limits.max_queued_tokens
        queued = sum(len(i.prompt_ids) for i in self.waiting if isinstance(i, TokenizedRequest))
        if queued + len(request.prompt_ids) > most:
            self.fail(
                request,
                "busy",
                f"server busy: {queued} prompt tokens wait to start, and this prompt's "
                f"{len(request.prompt_ids)} would pass the limit of {most} "
                "(--max-queued-tokens); retry later",
            )
            return
        self.waiting.append(request)

    def admit(self) -> None:
        """Start waiting requests and resume paused sequences, oldest first, while a batch
        place and the KV of their tokens so far fit."""
        while self.waiting and self.batch_size() < self.config.max_batch:
            item = self.waiting[0]
            # Every request fits the pool alone: its context is at most what the pool holds.
            if isinstance(item, Sequence):
                tokens = item.tokens()
            else:
                tokens = np.asarray(item.prompt_ids, dtype=np.int32)
            # A block of headroom for each running sequence, which may need one next step.
            needed = self.layout.blocks_for(len(tokens)) + len(self.running)
            if not self.allocator.can_allocate(needed):
                return
            self.waiting.popleft()
            sequence = item if isinstance(item, Sequence) else self.admitted(item)
            if sequence is not None:
                self.start(sequence, tokens)

    def batch_size(self) -> int:
        """The sequences holding a batch place: running, being prefilled or encoded."""
        return len(self.running) + len(self.prefilling) + len(self.encoding)

    def admitted(self, request: TokenizedRequest) -> Sequence | None:
        """A new request's sequence, its sampling set up (None, the request failed, where its
        parameters cannot be)."""
        try:
            sampling = protocol.sampling_params(request.sampling)
            choice = TokenChoice(
                request.prompt_ids,
                request.max_tokens,
                sampling,
                request.stop_token_ids,
                self.grammar_tokenizer if sampling.constrained else None,
            )
        except ValueError as e:
            self.fail(request, "bad_request", str(e))
            return None
        media = tuple((m.offset, prepared_media(m)) for m in request.media)
        return Sequence(request, SequenceKv(), choice, media=media)

    def start(self, sequence: Sequence, tokens: np.ndarray) -> None:
        """Give a sequence its KV for `tokens` (its prompt, or its prompt and what it generated
        before a pause), taking what the prefix cache holds of them; the rest, but the last
        token, is prefilled in the steps to come, once the media it reaches are encoded."""
        keys = sequence.media_keys()
        kv, cached = self.prefix_cache.new_sequence(tokens[:-1], keys)
        kv.ensure(len(tokens))
        sequence.kv = kv
        # Media whose positions the cache holds whole need no embeddings.
        unencoded = [
            (offset, media)
            for offset, media in sequence.media
            if offset + media.n_tokens > cached and offset not in sequence.encoded
        ]
        if not unencoded:
            self.started(sequence, tokens, cached)
            return
        embeddings: Future[dict[int, np.ndarray]] = Future()
        self.encode_jobs.put((unencoded, embeddings))
        self.encoding[sequence.rid] = Encoding(sequence, tokens, cached, embeddings)

    def encode_in_turn(self) -> None:
        """The encoder thread: the embeddings of each job's media, by offset, one job after
        another (a job cancelled before its turn is skipped)."""
        # The tokenizer workers refuse media where the server has no projector.
        assert self.media is not None
        while True:
            media, embeddings = self.encode_jobs.get()
            if not embeddings.set_running_or_notify_cancel():
                continue
            try:
                embeddings.set_result({offset: self.media.encode(m) for offset, m in media})
            except Exception as e:  # said to the request by the loop
                embeddings.set_exception(e)

    def start_encoded(self) -> None:
        """Start the sequences whose media are encoded, in the order they began; fail those
        whose media the towers refused."""
        for rid, encoding in list(self.encoding.items()):
            if not encoding.embeddings.done():
                continue
            del self.encoding[rid]
            sequence = encoding.sequence
            try:
                sequence.encoded.update(encoding.embeddings.result())
            except (Gemma4Error, ValueError) as e:
                sequence.kv.release()
                self.fail(sequence.request, "internal", f"cannot encode the prompt's media: {e}")
                continue
            self.started(sequence, encoding.tokens, encoding.cached)

    def started(self, sequence: Sequence, tokens: np.ndarray, cached: int) -> None:
        """A sequence given its KV and its media's embeddings joins the prefill (or, with
        nothing to write, the running sequences)."""
        if sequence.media:
            placed = tuple(
                PlacedMedia(offset, sequence.encoded[offset], media.digest, media.bidirectional)
                for offset, media in sequence.media
                if offset in sequence.encoded
            )
            sequence.embeddings = Prompt(tokens, placed).embeddings()
        sequence.next_token, sequence.hidden = int(tokens[-1]), None
        if not sequence.choice.token_ids:  # the first start: the client hears of the cache
            sequence.cached_tokens = cached
        sequence.unwritten = model_tokens(tokens, sequence.media_keys(), self.pad_id)[cached:-1]
        if len(sequence.unwritten) == 0:
            self.running[sequence.rid] = sequence
        else:
            self.prefilling[sequence.rid] = sequence

    def prefill_feeds(self) -> list[tuple[Sequence, Feed]]:
        """The next `prefill_chunk` tokens of the prompts being prefilled, oldest first, as a
        feed for each sequence they reach."""
        sequences = list(self.prefilling.values())
        feeds = self.runner.next_prefill(
            [(s.kv, s.unwritten) for s in sequences],
            self.config.prefill_chunk,
            [s.unwritten_spans() for s in sequences],
        )
        return [(s, s.with_media(feed)) for s, feed in zip(sequences, feeds, strict=False)]

    def prefilled(self, sequence: Sequence, feed: Feed) -> None:
        """A chunk of a sequence's prompt is written; once the last one is, the sequence
        joins the next step."""
        sequence.unwritten = sequence.unwritten[len(feed.tokens) :]
        if len(sequence.unwritten) == 0:
            del self.prefilling[sequence.rid]
            self.prefix_cache.remember(sequence.kv, sequence.tokens()[:-1], sequence.media_keys())
            self.running[sequence.rid] = sequence

    def compute(
        self, decoding: list[Feed], prefilling: list[tuple[Sequence, Feed]]
    ) -> list[FeedResult]:
        """Run the decode feeds and the prefill feeds in one call; the decode feeds' outputs.
        Where the core refuses the call (it then writes nothing), each prefill feed is run
        alone, and a sequence whose prompt it refuses fails, before the decode feeds run."""
        try:
            results = self.runner.forward([*decoding, *(feed for _, feed in prefilling)])
        except ValueError:
            if not prefilling:
                raise
        else:
            for sequence, feed in prefilling:
                self.prefilled(sequence, feed)
            return results[: len(decoding)]
        for sequence, feed in prefilling:
            try:
                self.runner.forward([feed])
            except ValueError as e:
                del self.prefilling[sequence.rid]
                sequence.kv.release()
                self.fail(sequence.request, "internal", f"prefill failed: {e}")
            else:
                self.prefilled(sequence, feed)
        return self.runner.forward(decoding) if decoding else []

    def abort(self, ended: EndedRequests) -> None:
        """Stop requests wherever they are, and free their KV."""
        rids = set(ended.rids)
        self.waiting = deque(item for item in self.waiting if item.rid not in rids)
        for rid in rids:
            if rid in self.running:
                sequence = self.running.pop(rid)
                self.prefix_cache.release(sequence.kv, sequence.tokens(), sequence.media_keys())
            elif rid in self.prefilling:
                self.prefilling.pop(rid).kv.release()
            elif rid in self.encoding:
                encoding = self.encoding.pop(rid)
                encoding.embeddings.cancel()  # where it has not begun; else it is dropped
                encoding.sequence.kv.release()

    def make_room(self) -> None:
        """Give every running sequence the blocks its next step may write (its next token and
        its drafts), pausing the youngest while the pool is short."""
        draft_tokens = 0 if self.speculator is None else self.speculator.draft_tokens
        while self.running:
            wanted = {
                rid: s.kv.length + 1 + min(draft_tokens, max(0, s.draft_limit()))
                for rid, s in self.running.items()
            }
            missing = sum(
                max(0, self.layout.blocks_for(n) - len(self.running[rid].kv.block_table))
                for rid, n in wanted.items()
            )
            if missing <= self.allocator.free_blocks:
                for rid, n in wanted.items():
                    self.running[rid].kv.ensure(n)
                return
            # Even a lone sequence pauses where prompts being prefilled hold the rest: they
            # finish, and it resumes.
            self.pause(next(reversed(self.running)))

    def pause(self, rid: int) -> None:
        """Take a running sequence off the pool (its KV left in the prefix cache, so that it
        resumes computing little) and queue it first, to resume."""
        sequence = self.running.pop(rid)
        self.prefix_cache.release(sequence.kv, sequence.tokens(), sequence.media_keys())
        self.waiting.appendleft(sequence)

    def step(self) -> None:
        """Decode every running sequence (its next token and, where the server drafts, the
        drafts after it, verified together) and write the next chunk of the prompts being
        prefilled, in one call."""
        self.make_room()
        sequences = list(self.running.values())
        prefill = self.prefill_feeds()
        if not sequences and not prefill:
            return
        speculator = self.speculator
        if speculator is None:
            drafts = [np.empty(0, dtype=np.int32)] * len(sequences)
        else:
            contexts = [s.draft_context() for s in sequences]
            drafts = speculator.propose(contexts, [s.draft_limit() for s in sequences])
        hidden = speculator is not None and speculator.needs_hidden
        feeds = [
            verification_feed(s.kv, s.next_token, d, not s.choice.needs_logits, hidden)
            for s, d in zip(sequences, drafts, strict=True)
        ]
        results = self.compute(feeds, prefill)
        outputs: dict[int, list[TokenOutput]] = {}
        for sequence, result, drafted in zip(sequences, results, drafts, strict=True):
            rid = sequence.request.rid
            try:
                steps = next_tokens(result, sequence.choice, drafted)
            except Exception as e:  # a sampler failure ends its request, never the worker
                self.running.pop(rid).kv.release()
                self.fail(sequence.request, "internal", f"sampling failed: {e}")
                continue
            first = len(sequence.choice.token_ids) == len(steps)  # these are its first tokens
            outputs.setdefault(sequence.request.tokenizer, []).extend(
                TokenOutput(
                    rid=rid,
                    token_id=step.token_id,
                    logprob=step.sampled.logprob,
                    top_logprobs=list(step.sampled.top_logprobs) or None,
                    finish_reason=step.finish_reason,
                    cached_tokens=sequence.cached_tokens if first and i == 0 else None,
                )
                for i, step in enumerate(steps)
            )
            if steps[-1].finish_reason is not None:
                self.running.pop(rid)
                self.prefix_cache.release(sequence.kv, sequence.tokens(), sequence.media_keys())
                continue
            sequence.next_token = steps[-1].token_id
            if speculator is not None:
                accepted = speculator.settle(self.runner, sequence.kv, drafted, steps)
                sequence.hidden = None if result.hidden is None else result.hidden[accepted]
        names = self.config.tokenizer_names()
        for index, batch in outputs.items():
            self.mail.send(names[index], StepTokens(outputs=batch))

    def fail(self, request: TokenizedRequest, code: protocol.ErrorCode, message: str) -> None:
        """End a request with an error, through its tokenizer worker."""
        self.mail.send(
            self.config.tokenizer_names()[request.tokenizer],
            RequestFailure(rid=request.rid, code=code, message=message),
        )

    takes = protocol.DecodeInbox
    handlers = {TokenizedRequest: queue, EndedRequests: abort}


if __name__ == "__main__":
    run_worker(DecodeWorker)
