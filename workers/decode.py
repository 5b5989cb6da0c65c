"""The decode worker: owner of the KV pool and scheduler of every request.

Requests wait in arrival order until a batch place and the KV blocks for their whole length
(prompt plus max_tokens) are free, so a running sequence never runs out of room and no
sequence can touch another's blocks. The prompt, but its last token, goes to a prefill
worker; the last prompt token is the sequence's first decode step, which yields the first
logits. Each step then decodes every running sequence together (the weights are read once
for all of them), samples each one's next token, sends the tokens to the tokenizer workers and
retires the sequences that ended.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from pygemma4 import protocol
from pygemma4.constraints import ConstraintError, grammar_vocabulary
from pygemma4.generation import TokenChoice
from pygemma4.kv import BlockAllocator, SequenceKv
from pygemma4.protocol import (
    EndedRequests,
    KvUsage,
    PrefillResult,
    PromptToPrefill,
    RequestFailure,
    StepTokens,
    TokenizedRequest,
    TokenOutput,
)
from pygemma4.runner import Feed, next_token
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


class DecodeWorker(Worker):
    """Schedules, batches and decodes."""

    def __init__(self, config: ServerConfig, name: str, epoch: int) -> None:
        peers = ["frontend", *config.tokenizer_names(), *config.prefill_names()]
        super().__init__(config, name, peers)
        self.epoch = epoch
        self.runner = shared_pool_runner(config, config.max_batch, config.threads)
        self.layout = kv_layout(config.kv)
        self.allocator = BlockAllocator(self.layout)
        self.waiting: deque[TokenizedRequest] = deque()
        self.prefilling: dict[int, Sequence] = {}
        self.running: dict[int, Sequence] = {}
        self.next_prefill = 0
        self.reported_blocks_used = 0
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
        self.report_kv_usage()

    def report_kv_usage(self) -> None:
        """Send the front end the KV blocks held, when that changed since it was last told."""
        used = self.layout.n_blocks - self.allocator.free_blocks
        if used != self.reported_blocks_used:
            self.reported_blocks_used = used
            self.mail.send("frontend", KvUsage(blocks_used=used, blocks_total=self.layout.n_blocks))

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
        """Reserve a request's KV and send its prompt to be prefilled."""
        kv = SequenceKv(self.allocator)
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
        prompt = request.prompt_ids
        sequence = Sequence(request, kv, choice, next_token=prompt[-1])
        if len(prompt) == 1:
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
                token_ids=prompt[:-1],
                start=0,
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
            sequence.kv.advance(len(sequence.request.prompt_ids) - 1)
            self.running[done.rid] = sequence

    def abort(self, ended: EndedRequests) -> None:
        """Stop requests wherever they are; KV being prefilled is freed once the prefill
        worker is done writing it."""
        rids = set(ended.rids)
        self.waiting = deque(r for r in self.waiting if r.rid not in rids)
        for rid in rids:
            if rid in self.running:
                self.running.pop(rid).kv.release()
            elif rid in self.prefilling:
                self.prefilling[rid].aborted = True

    def step(self) -> None:
        """Decode one token for every running sequence."""
        sequences = list(self.running.values())
        feeds = [
            Feed(s.kv, np.array([s.next_token], dtype=np.int32), greedy=not s.choice.needs_logits)
            for s in sequences
        ]
        results = self.runner.decode(feeds)
        outputs: dict[int, list[TokenOutput]] = {}
        for sequence, result in zip(sequences, results, strict=True):
            rid = sequence.request.rid
            try:
                sampled, reason = next_token(result, sequence.choice)
            except Exception as e:  # a sampler failure ends its request, never the worker
                self.running.pop(rid).kv.release()
                self.fail(sequence.request, "internal", f"sampling failed: {e}")
                continue
            sequence.next_token = sampled.token_id
            outputs.setdefault(sequence.request.tokenizer, []).append(
                TokenOutput(
                    rid=rid,
                    token_id=sampled.token_id,
                    logprob=sampled.logprob,
                    top_logprobs=list(sampled.top_logprobs) or None,
                    finish_reason=reason,
                )
            )
            if reason is not None:
                self.running.pop(rid).kv.release()
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
