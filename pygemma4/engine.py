"""The in-process inference engine: a Gemma 4 GGUF loaded into the C++ core."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from pygemma4 import _core
from pygemma4.config import ModelConfig, ModelFile, open_model
from pygemma4.errors import Gemma4Error, TokenizerError
from pygemma4.generation import Generation, GenerationChunk
from pygemma4.sampling import SamplingParams
from pygemma4.tokenizer import Tokenizer, carries_tokenizer

BACKENDS = ("cpu",)
DEFAULT_N_CTX = 4096


class ContextFullError(Gemma4Error, ValueError):
    """A sequence would grow past the context the engine was created with."""


class NoFreeSequenceError(Gemma4Error, RuntimeError):
    """Every sequence slot of the engine is in use."""


def default_threads() -> int:
    """The number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without affinity masks
        return os.cpu_count() or 1


class Engine:
    """A Gemma 4 model ready to compute logits and generate tokens.

    `max_sequences` sequences can be held at once (each with its own KV cache and positions);
    `n_batch` bounds the tokens of one forward step (longer prompts are split into chunks).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: str = "cpu",
        threads: int | None = None,
        n_ctx: int | None = None,
        max_sequences: int = 1,
        n_batch: int = 256,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r}: this build supports {', '.join(BACKENDS)}"
            )
        threads = default_threads() if threads is None else threads
        _require_positive("threads", threads)
        _require_positive("max_sequences", max_sequences)
        _require_positive("n_batch", n_batch)
        self.model_file: ModelFile = open_model(path)
        self.config: ModelConfig = self.model_file.config
        n_ctx = min(self.config.n_ctx_train, DEFAULT_N_CTX) if n_ctx is None else n_ctx
        _require_positive("n_ctx", n_ctx)
        self.path = Path(path)
        self.backend = backend
        self.threads = threads
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        tensors = [
            _core.TensorEntry(t.name, t.type_id, list(t.shape), t.offset, t.nbytes)
            for t in self.model_file.gguf.tensors.values()
        ]
        self._model = _core.Model(
            str(self.path), tensors, self.config, n_ctx, max_sequences, n_batch, threads
        )
        self._free_slots = list(range(max_sequences - 1, -1, -1))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model knows."""
        return self.config.vocab_size

    @property
    def max_sequences(self) -> int:
        """How many sequences the engine can hold at once."""
        return self._model.n_slots

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache allocated for all sequence slots."""
        return self._model.kv_bytes

    def new_sequence(self) -> GenerationSequence:
        """Start an empty sequence; close it (or use `with`) to free its slot."""
        if not self._free_slots:
            raise NoFreeSequenceError(
                f"all {self.max_sequences} sequence slots are in use; close one first"
            )
        slot = self._free_slots.pop()
        self._model.reset(slot)
        return GenerationSequence(self, slot)

    def forward(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits float32 [len(token_ids), vocab] for every position of a fresh sequence."""
        with self.new_sequence() as seq:
            return seq.append(token_ids, all_logits=True)

    @property
    def has_tokenizer(self) -> bool:
        """Whether the GGUF carries a tokenizer (files of bare weights may not)."""
        return carries_tokenizer(self.model_file.gguf.metadata)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, read from the GGUF's metadata."""
        if not self.has_tokenizer:
            raise TokenizerError(f"{self.path}: the file carries no tokenizer")
        return Tokenizer.from_metadata(self.model_file.gguf.metadata)

    def generate(
        self,
        token_ids: Sequence[int] | np.ndarray,
        max_tokens: int,
        sampling: SamplingParams | None = None,
        stop_tokens: Iterable[int] | None = None,
    ) -> list[int]:
        """The ids of a continuation of `token_ids`: greedy unless `sampling` says otherwise.

        It ends after `max_tokens`, at one of `stop_tokens` (by default the model's
        end-of-generation tokens; `()` for none), which is included, or at the token that
        completes one of `sampling.stop`'s strings.
        """
        return [c.token_id for c in self.stream(token_ids, max_tokens, sampling, stop_tokens)]

    def stream(
        self,
        token_ids: Sequence[int] | np.ndarray,
        max_tokens: int,
        sampling: SamplingParams | None = None,
        stop_tokens: Iterable[int] | None = None,
    ) -> Iterator[GenerationChunk]:
        """The continuation of `generate`, one chunk (token, text, logprobs) at a time."""
        prompt = self.check_tokens(token_ids)
        tokenizer = self.tokenizer if self.has_tokenizer else None
        generation = Generation(prompt.tolist(), max_tokens, sampling, tokenizer, stop_tokens)
        if len(prompt) + max_tokens - 1 > self.n_ctx:
            raise ContextFullError(
                f"prompt of {len(prompt)} tokens plus {max_tokens} new tokens exceeds the "
                f"context of {self.n_ctx}"
            )
        return self._run(prompt, generation)

    def _run(self, prompt: np.ndarray, generation: Generation) -> Iterator[GenerationChunk]:
        with self.new_sequence() as seq:
            logits = seq.append(prompt)
            while True:
                chunk = generation.step(logits)
                yield chunk
                if chunk.finish_reason is not None:
                    return
                logits = seq.append([chunk.token_id])

    def decode(self, sequences: Sequence[GenerationSequence], tokens: Sequence[int]) -> np.ndarray:
        """One batched step: appends tokens[i] to sequences[i] for all i at once (weights read
        once for the whole batch); returns logits float32 [len(sequences), vocab]."""
        if len(sequences) != len(tokens):
            raise ValueError("decode needs exactly one token per sequence")
        if len({seq.slot for seq in sequences}) != len(sequences):
            raise ValueError("a sequence appears twice in one decode step")
        ids = self.check_tokens(tokens)
        logits = []
        for first in range(0, len(sequences), self.n_batch):
            group = sequences[first : first + self.n_batch]
            positions = []
            for seq in group:
                seq.check_open()
                if seq.length + 1 > self.n_ctx:
                    raise ContextFullError(f"sequence is full: context is {self.n_ctx} tokens")
                positions.append(seq.length)
            slots = np.array([seq.slot for seq in group], dtype=np.int32)
            logits.append(
                self._model.forward(
                    ids[first : first + len(group)],
                    np.array(positions, dtype=np.int32),
                    slots,
                    np.arange(len(group), dtype=np.int32),
                )
            )
        return np.concatenate(logits)

    def check_tokens(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The ids as int32, after checking they are a non-empty list of valid token ids."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token ids must be a non-empty 1-D sequence of integers")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} out of range [0, {self.vocab_size})")
        return ids.astype(np.int32)


class GenerationSequence:
    """One sequence held by an Engine: its tokens so far live in the engine's KV cache."""

    def __init__(self, engine: Engine, slot: int) -> None:
        self.engine = engine
        self.slot = slot
        self._open = True

    @property
    def length(self) -> int:
        """Tokens in the sequence so far."""
        self.check_open()
        return self.engine._model.length(self.slot)

    def append(self, token_ids: Sequence[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Feed tokens; returns the logits after the last one [vocab], or for every fed
        token [len, vocab] with all_logits."""
        self.check_open()
        ids = self.engine.check_tokens(token_ids)
        start = self.length
        if start + len(ids) > self.engine.n_ctx:
            raise ContextFullError(
                f"sequence of {start + len(ids)} tokens is longer than the context "
                f"({self.engine.n_ctx})"
            )
        model = self.engine._model
        chunks = []
        for first in range(0, len(ids), self.engine.n_batch):
            chunk = ids[first : first + self.engine.n_batch]
            n = len(chunk)
            last = first + n == len(ids)
            if all_logits:
                rows = np.arange(n, dtype=np.int32)
            elif last:
                rows = np.array([n - 1], dtype=np.int32)
            else:
                rows = np.empty(0, dtype=np.int32)
            positions = np.arange(start + first, start + first + n, dtype=np.int32)
            slots = np.full(n, self.slot, dtype=np.int32)
            chunks.append(model.forward(chunk, positions, slots, rows))
        logits = np.concatenate(chunks)
        return logits if all_logits else logits[-1]

    def check_open(self) -> None:
        """Raise if the sequence was closed."""
        if not self._open:
            raise Gemma4Error("sequence is closed")

    def close(self) -> None:
        """Free the sequence's slot for another sequence."""
        if self._open:
            self._open = False
            self.engine._free_slots.append(self.slot)

    def __enter__(self) -> GenerationSequence:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
