"""The decode worker: owner of the KV pool and scheduler of every request.

Requests wait in arrival order until a batch place and the KV blocks for their whole length
(prompt plus max_tokens) are free, so a running sequence never runs out of room and no
sequence can touch another's blocks. The prompt, but its last token, goes to a prefill
worker; the last prompt token is the sequence's first decode step, which yields the first
logits. Each step then decodes every running sequence together (the weights are read once
for all of them), samples each one's next token, sends the tokens to the tokenizer workers and
retires the sequences that ended. With a drafter, each sequence's step also carries its drafts,
verified together: a sequence may gain several tokens in one step (`pygemma4.speculative`).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from pygemma4 import protocol
from pygemma4.constraints import ConstraintError, grammar_vocabulary
from pygemma4.drafter import DraftContext
from pygemma4.generation import TokenChoice
from pygemma4.kv import BlockAllocator, SequenceKv
from pygemma4.prefix_cache import PrefixCache
from pygemma4.protocol import (
    DecodeLoad,
    EndedRequests,
    PrefillResult,
    PromptToPrefill,
    RequestFailure,
    StepTokens,
    TokenizedRequest,
    TokenOutput,
)
from pygemma4.runner import next_tokens
from pygemma4.speculative import Speculator, verification_feed
from pygemma4.tokenizer import Tokenizer
from pygemma4.workers.runtime import (
    ServerConfig,
    Worker,
    kv_layout,
    run_worker,
    shared_pool_runner,
)


@dataclass
class Sequence:
    """A request the decode worker has admitted."""

    request: TokenizedRequest
    kv: SequenceKv
    choice: TokenChoice
    next_token: int = 0
    """The token the next step feeds."""
    aborted: bool = False
    """Aborted while its prompt was being prefilled: freed once the prefill is done."""
    hidden: np.ndarray | None = None
    """The target's final hidden state before `next_token` (what an assistant drafts from),
    once a step brought it back."""
    cached_tokens: int = 0
    """Prompt tokens the prefix cache held (told with the first token)."""

    def tokens(self) -> np.ndarray:
        """The prompt and the tokens generated so far."""
        generated = np.asarray(self.choice.token_ids, dtype=np.int32)
        return np.concatenate([np.asarray(self.request.prompt_ids, dtype=np.int32), generated])

    def draft_context(self) -> DraftContext:
        """What a drafter reads of this sequence."""
        return DraftContext(self.kv, self.tokens(), self.hidden)

    def draft_limit(self) -> int:
        """How many tokens may be drafted for it now: none where it opted out, and never past
        its last token (which is never fed)."""
        return self.choice.tokens_left - 1 if self.request.speculative else 0


class DecodeWorker(Worker):
    """Schedules, batches and decodes."""

    def __init__(self, config: ServerConfig, name: str, epoch: int) -> None:
        peers = ["frontend", *config.tokenizer_names(), *config.prefill_names()]
        super().__init__(config, name, peers)
        self.epoch = epoch
        # A step feeds every running sequence its next token and its drafts.
        tokens_per_sequence = 1 + (config.draft_tokens if config.draft is not None else 0)
        self.runner = shared_pool_runner(
            config, config.max_batch * tokens_per_sequence, config.threads
        )
        # Made before the target's first step (on CUDA the step is captured once).
        self.speculator = (
            None
            if config.draft is None
            else Speculator.open(config.draft, config.draft_tokens, self.runner, config.max_batch)
        )
        self.layout = kv_layout(config.kv)
        self.allocator = BlockAllocator(self.layout)
        self.prefix_cache = PrefixCache(
            self.allocator, self.runner.pool, self.runner.config, config.prefix_snapshots
        )
        self.waiting: deque[TokenizedRequest] = deque()
        self.prefilling: dict[int, Sequence] = {}
        self.running: dict[int, Sequence] = {}
        self.next_prefill = 0
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

    def busy(self) -> bool:
        """Whether sequences are running (the loop then steps without waiting)."""
        return bool(self.running)

    def work(self) -> None:
        """Admit what fits, then decode one step; tell the front end when the KV held
        changed."""
        self.admit()
        if self.running:
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
        """Queue a request to be admitted when it fits."""
        self.waiting.append(request)

    def admit(self) -> None:
        """Start waiting requests, oldest first, while a batch place and their KV fit."""
        while self.waiting and len(self.running) + len(self.prefilling) < self.config.max_batch:
            request = self.waiting[0]
            positions = len(request.prompt_ids) + request.max_tokens - 1
            needed = self.layout.blocks_for(positions)
            if needed > self.layout.n_blocks:
                self.waiting.popleft()
                self.fail(
                    request,
                    "context_length",
                    f"the request needs KV for {positions} positions, more than the server's "
                    f"pool holds ({self.layout.n_blocks * self.layout.block_size})",
                )
                continue
            if not self.allocator.can_allocate(needed):
                return
            self.waiting.popleft()
            self.start(request, positions)

    def start(self, request: TokenizedRequest, positions: int) -> None:
        """Reserve a request's KV (taking what the prefix cache holds of its prompt) and send
        the rest of the prompt to be prefilled."""
        prompt = request.prompt_ids
        kv, cached = self.prefix_cache.new_sequence(prompt[:-1])
        kv.ensure(positions)
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
            kv.release()
            self.fail(request, "bad_request", str(e))
            return
        sequence = Sequence(request, kv, choice, next_token=prompt[-1], cached_tokens=cached)
        if cached == len(prompt) - 1:
            self.running[request.rid] = sequence
            return
        self.prefilling[request.rid] = sequence
        prefill = self.config.prefill_names()[self.next_prefill % self.config.prefill_workers]
        self.next_prefill += 1
        self.mail.send(
            prefill,
            PromptToPrefill(
                rid=request.rid,
                epoch=self.epoch,
                token_ids=prompt[cached:-1],
                start=cached,
                block_table=kv.block_table,
                ring_set=kv.ring_set,
            ),
        )

    def prefilled(self, done: PrefillResult) -> None:
        """A prompt's KV is written: the sequence joins the next step."""
        if done.epoch != self.epoch:
            return
        sequence = self.prefilling.pop(done.rid, None)
        if sequence is None:
            return
        if sequence.aborted:
            sequence.kv.release()
        elif done.error is not None:
            sequence.kv.release()
            self.fail(sequence.request, "internal", f"prefill failed: {done.error}")
        else:
            prompt = sequence.request.prompt_ids
            sequence.kv.advance(len(prompt) - 1 - sequence.cached_tokens)
            self.prefix_cache.remember(sequence.kv, prompt[:-1])
            self.running[done.rid] = sequence

    def abort(self, ended: EndedRequests) -> None:
        """Stop requests wherever they are; KV being prefilled is freed once the prefill
        worker is done writing it."""
        rids = set(ended.rids)
        self.waiting = deque(r for r in self.waiting if r.rid not in rids)
        for rid in rids:
            if rid in self.running:
                sequence = self.running.pop(rid)
                self.prefix_cache.release(sequence.kv, sequence.tokens())
            elif rid in self.prefilling:
                self.prefilling[rid].aborted = True

    def step(self) -> None:
        """Decode every running sequence: its next token and, where the server drafts, the
        drafts after it, verified together."""
        sequences = list(self.running.values())
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
        results = self.runner.decode(feeds)
        outputs: dict[int, list[TokenOutput]] = {}
        for sequence, result, drafted in zip(sequences, results, drafts, strict=True):
            rid = sequence.request.rid
            try:
                steps = next_tokens(result, sequence.choice, drafted)
            except Exception as e:  # a sampler failure ends its request, never the worker
                self.running.pop(rid).kv.release()
                self.fail(sequence.request, "internal", f"sampling failed: {e}")
                continue
            first = len(sequence.choice.token_ids) == len(steps)
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
                self.prefix_cache.release(sequence.kv, sequence.tokens())
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
    handlers = {TokenizedRequest: queue, PrefillResult: prefilled, EndedRequests: abort}


if __name__ == "__main__":
    run_worker(DecodeWorker)
