"""The in-process inference engine: a Gemma 4 GGUF loaded into the C++ core."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pygemma4.config import ModelConfig, ModelFile, open_model
from pygemma4.drafter import DraftContext
from pygemma4.errors import Gemma4Error, MediaError, TokenizerError, require_positive
from pygemma4.generation import Generation, GenerationChunk, room_for_tokens
from pygemma4.kv import (
    DEFAULT_BLOCK_SIZE,
    BlockAllocator,
    KvLayout,
    SequenceKv,
    resolve_kv_dtype,
)
from pygemma4.media.audio import AudioInput
from pygemma4.media.audio_encoder import AudioEmbedding, AudioEncoder
from pygemma4.media.encoders import MediaEncoders
from pygemma4.media.image import DEFAULT_SOFT_TOKENS, ImageInput
from pygemma4.media.image_blocks import ImageBlockEncoder
from pygemma4.media.kinds import AUDIO, IMAGE, PreparedMedia
from pygemma4.multimodal import MediaKind, MediaPart, Prompt, media_pad_id, prepare_prompt
from pygemma4.prefix_cache import PrefixCache
from pygemma4.runner import (
    Feed,
    ModelRunner,
    check_backend,
    default_threads,
    next_tokens,
    pool_device,
)
from pygemma4.sampling import SamplingParams
from pygemma4.speculative import (
    DEFAULT_DRAFT_TOKENS,
    SpeculationStats,
    Speculator,
    verification_feed,
)
from pygemma4.tokenizer import Tokenizer, carries_tokenizer
from pygemma4.vision import ImageEmbedding, VisionTower

DEFAULT_N_CTX = 4096

PromptInput = Sequence[int] | np.ndarray | Prompt
"""Token ids, or a Prompt of `Engine.prepare` (token ids with media embeddings)."""


class ContextFullError(Gemma4Error, ValueError):
    """A sequence would grow past the context the engine was created with."""


class NoFreeSequenceError(Gemma4Error, RuntimeError):
    """Every sequence slot of the engine is in use."""


def default_n_ctx(config: ModelConfig) -> int:
    """The context per sequence when none is asked for: the model's, up to DEFAULT_N_CTX."""
    return min(config.n_ctx_train, DEFAULT_N_CTX)


class Engine:
    """A Gemma 4 model ready to compute logits and generate tokens.

    `max_sequences` sequences can be held at once (each with its own KV and positions, in a
    KV pool of the engine's own, laid out as `kv_layout`); `n_batch` bounds the tokens of one
    forward step (longer prompts are split into chunks). `backend` "cuda" computes on CUDA
    device `device` (BackendUnavailableError says why where it cannot). Every step runs through
    `runner`, the same `ModelRunner` the server's workers use. KV entries are stored as
    `kv_dtype` (one of `pygemma4.kv.KV_DTYPES`; by default f16 on the CPU, f32 on CUDA, the
    only type CUDA takes).

    With `draft` ("ngram", or the path of a Gemma 4 assistant GGUF made for this model),
    `generate` and `stream` decode speculatively: the drafter proposes `draft_tokens` tokens,
    one step verifies them, and the output is what it would be without drafting (greedy: the
    same tokens; sampled: the same distribution). `speculation` counts what was kept.

    With `mmproj` (the model's projector GGUF, checked against the model), the engine takes
    the images and audio its towers hear: `prepare` turns chat messages with image and audio
    parts into a `Prompt` that `forward`, `generate` and `stream` take; `embed_image` and
    `embed_audio` encode one image or clip; each image becomes at most `max_image_tokens` soft
    tokens (70, 140, 280, 560 or 1120), each clip one per 40 ms. A unified (12B-style) model's
    image tokens attend to each other in both directions, so each image is computed in one
    call: `n_batch` is raised to `max_image_tokens` where it is smaller.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: str = "cpu",
        threads: int | None = None,
        n_ctx: int | None = None,
        max_sequences: int = 1,
        n_batch: int = 256,
        device: int = 0,
        draft: str | os.PathLike[str] | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        prefix_snapshots: int | None = None,
        kv_dtype: str | None = None,
        mmproj: str | os.PathLike[str] | None = None,
        max_image_tokens: int = DEFAULT_SOFT_TOKENS,
    ) -> None:
        kv_dtype = resolve_kv_dtype(kv_dtype, backend)
        check_backend(backend, device)
        threads = default_threads() if threads is None else threads
        require_positive("threads", threads)
        require_positive("max_sequences", max_sequences)
        require_positive("n_batch", n_batch)
        self.model_file: ModelFile = open_model(path)
        self.config: ModelConfig = self.model_file.config
        n_ctx = default_n_ctx(self.config) if n_ctx is None else n_ctx
        require_positive("n_ctx", n_ctx)
        self.path = Path(path)
        self.media: MediaEncoders | None = None
        if mmproj is not None:
            self.media = MediaEncoders(
                mmproj, self.model_file, max_image_tokens, threads, backend, device
            )
            # Each image whose soft tokens attend to each other is computed in one call.
            n_batch = max(n_batch, self.media.preprocessor.image_call_tokens)
        self.backend = backend
        self.device = device
        self.threads = threads
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        # A ring set for each sequence, and as many again kept as prefix snapshots (none on
        # CUDA, where copying ring sets is not verified on a GPU yet).
        if prefix_snapshots is None:
            prefix_snapshots = max_sequences if backend == "cpu" else 0
        self._max_sequences = max_sequences
        self.kv_layout = KvLayout.for_model(
            self.config,
            n_ctx,
            max_sequences + prefix_snapshots,
            n_batch,
            n_blocks=-(-n_ctx // DEFAULT_BLOCK_SIZE) * max_sequences,
            kv_dtype=kv_dtype,
        )
        pool = self.kv_layout.new_pool(self.config, device=pool_device(backend, device))
        self.runner = ModelRunner(self.model_file, pool, n_batch, threads, backend, device)
        self._allocator = BlockAllocator(self.kv_layout)
        self.prefix_cache = PrefixCache(self._allocator, pool, self.config, prefix_snapshots)
        self.speculator = (
            None
            if draft is None
            else Speculator.open(draft, draft_tokens, self.runner, max_sequences)
        )
        self.vision: VisionTower | ImageBlockEncoder | None = (
            None if self.media is None else self.media.vision
        )
        self.audio: AudioEncoder | None = None if self.media is None else self.media.audio

    def embed_image(self, image: ImageInput, max_image_tokens: int | None = None) -> ImageEmbedding:
        """The embeddings `image` (a path, bytes, data URI, PIL image or uint8 array) gives the
        model in place of its soft tokens, at most `max_image_tokens` of them (by default and
        at most the engine's)."""
        return self._media_for(IMAGE).embed_image(image, max_image_tokens)

    def embed_audio(self, audio: AudioInput) -> AudioEmbedding:
        """The embeddings `audio` (a WAV path, WAV bytes or float samples at 16 kHz) gives the
        model in place of its soft tokens."""
        encoder = self._media_for(AUDIO).audio
        assert encoder is not None
        return encoder.embed_input(audio)

    def prepare(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        max_image_tokens: int | None = None,
        **template_kwargs: Any,
    ) -> Prompt:
        """The prompt of a conversation whose messages may hold image and audio parts (see
        pygemma4.multimodal): rendered by the chat template, each medium's soft tokens placed
        and its embeddings computed. Each image gets at most `max_image_tokens` soft tokens
        (by default and at most the engine's) unless its part asks for its own budget."""
        if max_image_tokens is not None:
            self._media_for(IMAGE).preprocessor.image_budget(max_image_tokens)

        def prepare(part: MediaPart) -> PreparedMedia:
            preprocessor = self._media_for(part.kind).preprocessor
            return preprocessor.prepare(part.kind, part.source, None, part.budget, max_image_tokens)

        def encode(media: PreparedMedia) -> np.ndarray:
            return self._media_for(media.kind).encode(media)

        return prepare_prompt(
            self.tokenizer, messages, prepare, encode, add_generation_prompt, **template_kwargs
        )

    def _media_for(self, kind: MediaKind) -> MediaEncoders:
        """The projector's towers, where one takes `kind` (MediaError otherwise)."""
        if self.media is None or not self.media.takes(kind):
            what, tower = ("images", "a vision") if kind is IMAGE else ("audio", "an audio")
            raise MediaError(
                f"{self.path}: the engine takes no {what} (give mmproj=FILE with {tower} tower)"
            )
        return self.media

    def as_prompt(self, prompt: PromptInput) -> Prompt:
        """`prompt` as a Prompt, its token ids checked (and its media's rows against the
        model's width)."""
        if isinstance(prompt, Prompt):
            ids = self.check_tokens(prompt.token_ids)
            for m in prompt.media:
                if m.embeddings.shape[1:] != (self.config.n_embd,) or not (
                    m.offset >= 0 and m.offset + m.length <= len(ids)
                ):
                    raise MediaError(
                        f"media at {m.offset} of a prompt of {len(ids)} tokens with rows of "
                        f"{m.embeddings.shape[1:]} do not fit this model (width "
                        f"{self.config.n_embd})"
                    )
            return Prompt(ids, prompt.media)
        return Prompt(self.check_tokens(prompt))

    @cached_property
    def pad_id(self) -> int:
        """The padding token, whose per-layer embeddings media positions take."""
        return media_pad_id(self.model_file.gguf.metadata)

    @property
    def speculation(self) -> SpeculationStats | None:
        """What drafting proposed and what was kept, since the engine was made (None without
        a drafter)."""
        return None if self.speculator is None else self.speculator.stats

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model knows."""
        return self.config.vocab_size

    @property
    def max_sequences(self) -> int:
        """How many sequences the engine can hold at once."""
        return self._max_sequences

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of KV pool laid out for all sequences (memory is taken as they fill it)."""
        return self.kv_layout.nbytes

    def new_sequence(self) -> GenerationSequence:
        """Start an empty sequence; close it (or use `with`) to free its slot."""
        self._check_free_slot()
        return GenerationSequence(self, SequenceKv(self._allocator))

    def _check_free_slot(self) -> None:
        """NoFreeSequenceError where `max_sequences` sequences are open (the ring sets that
        prefix snapshots may still take are not a sequence's)."""
        cache = self.prefix_cache
        if self._allocator.free_ring_sets <= cache.max_snapshots - len(cache.snapshots):
            raise NoFreeSequenceError(
                f"all {self.max_sequences} sequence slots are in use; close one first"
            )

    def forward(self, token_ids: PromptInput) -> np.ndarray:
        """Logits float32 [len(token_ids), vocab] for every position of a fresh sequence (of
        token ids, or a Prompt with media)."""
        prompt = self.as_prompt(token_ids)
        if not prompt.media:
            with self.new_sequence() as seq:
                return seq.append(prompt.token_ids, all_logits=True)
        with self.new_sequence() as seq:
            seq._room_for(prompt.token_ids)
            feed = Feed(
                seq.kv, prompt.model_tokens(self.pad_id), "all", embeddings=prompt.embeddings()
            )
            logits = self.runner.prefill(feed).logits
            assert logits is not None
            return logits

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
        token_ids: PromptInput,
        max_tokens: int,
        sampling: SamplingParams | None = None,
        stop_tokens: Iterable[int] | None = None,
        speculative: bool = True,
    ) -> list[int]:
        """The ids of a continuation of `token_ids`: greedy unless `sampling` says otherwise.

        It ends after `max_tokens`, at one of `stop_tokens` (by default the model's
        end-of-generation tokens; `()` for none), which is included, or at the token that
        completes one of `sampling.stop`'s strings. With a drafter, `speculative=False`
        decodes one token per step.
        """
        chunks = self.stream(token_ids, max_tokens, sampling, stop_tokens, speculative)
        return [c.token_id for c in chunks]

    def stream(
        self,
        token_ids: PromptInput,
        max_tokens: int,
        sampling: SamplingParams | None = None,
        stop_tokens: Iterable[int] | None = None,
        speculative: bool = True,
    ) -> Iterator[GenerationChunk]:
        """The continuation of `generate`, one chunk (token, text, logprobs) at a time."""
        prompt = self.as_prompt(token_ids)
        tokenizer = self.tokenizer if self.has_tokenizer else None
        generation = Generation(
            prompt.token_ids.tolist(), max_tokens, sampling, tokenizer, stop_tokens
        )
        if max_tokens > room_for_tokens(self.n_ctx, len(prompt)):
            raise ContextFullError(
                f"prompt of {len(prompt)} tokens plus {max_tokens} new tokens exceeds the "
                f"context of {self.n_ctx}"
            )
        return self._run(prompt, generation, self.speculator if speculative else None)

    def _run(
        self, prompt: Prompt, generation: Generation, speculator: Speculator | None
    ) -> Iterator[GenerationChunk]:
        self._check_free_slot()
        # The prompt as a server computes it (one process prefills all but the last token, the
        # last runs in a decode step), so that both give the same tokens; the prefix cache
        # holds what earlier sequences computed of it, named by its media's content too.
        ids, media = prompt.token_ids, prompt.media_keys()
        model_ids = prompt.model_tokens(self.pad_id)
        given = prompt.embeddings()
        kv, cached = self.prefix_cache.new_sequence(ids[:-1], media)
        with GenerationSequence(self, kv) as seq:
            try:
                rest = None if given is None else given.window(cached, len(ids) - 1)
                self.runner.prefill(Feed(seq.kv, model_ids[cached:-1], "none", embeddings=rest))
                self.prefix_cache.remember(seq.kv, ids[:-1], media)
                yield from self._decode(seq.kv, ids, generation, speculator)
            finally:
                tokens = np.concatenate([ids, np.asarray(generation.token_ids, np.int32)])
                self.prefix_cache.release(seq.kv, tokens, media)

    def _decode(
        self,
        kv: SequenceKv,
        prompt: np.ndarray,
        generation: Generation,
        speculator: Speculator | None,
    ) -> Iterator[GenerationChunk]:
        """Decode after the prompt's prefill, the last prompt token first."""
        hidden: np.ndarray | None = None
        while True:
            tokens = np.concatenate([prompt, np.asarray(generation.token_ids, np.int32)])
            drafts = np.empty(0, dtype=np.int32)
            if speculator is not None:
                context = DraftContext(kv, tokens, hidden)
                # The last token generated is never fed: drafts beyond it are wasted.
                drafts = speculator.propose([context], [generation.tokens_left - 1])[0]
            feed = verification_feed(
                kv,
                int(tokens[-1]),
                drafts,
                greedy=not generation.needs_logits,
                hidden=speculator is not None and speculator.needs_hidden,
            )
            result = self.runner.decode([feed])[0]
            steps = next_tokens(result, generation, drafts)
            yield from steps
            if steps[-1].finish_reason is not None:
                return
            if speculator is not None:
                accepted = speculator.settle(self.runner, kv, drafts, steps)
                hidden = None if result.hidden is None else result.hidden[accepted]

    def decode(self, sequences: Sequence[GenerationSequence], tokens: Sequence[int]) -> np.ndarray:
        """One batched step: appends tokens[i] to sequences[i] for all i at once (weights read
        once for the whole batch); returns logits float32 [len(sequences), vocab]."""
        if len(sequences) != len(tokens):
            raise ValueError("decode needs exactly one token per sequence")
        if len({id(seq) for seq in sequences}) != len(sequences):
            raise ValueError("a sequence appears twice in one decode step")
        ids = self.check_tokens(tokens)
        for seq in sequences:
            seq.check_open()
            if seq.engine is not self:
                raise ValueError("a sequence of another engine")
            if seq.length + 1 > self.n_ctx:
                raise ContextFullError(f"sequence is full: context is {self.n_ctx} tokens")
        feeds = [Feed(seq.kv, ids[i : i + 1]) for i, seq in enumerate(sequences)]
        return np.concatenate([result.logits for result in self.runner.decode(feeds)])

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
    """One sequence held by an Engine: its tokens so far live in the engine's KV pool, in the
    blocks and ring set of `kv`."""

    def __init__(self, engine: Engine, kv: SequenceKv) -> None:
        self.engine = engine
        self.kv = kv
        self._open = True

    @property
    def length(self) -> int:
        """Tokens in the sequence so far."""
        self.check_open()
        return self.kv.length

    def append(self, token_ids: Sequence[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Feed tokens; returns the logits after the last one [vocab], or for every fed
        token [len, vocab] with all_logits."""
        ids = self._room_for(token_ids)
        feed = Feed(self.kv, ids, "all" if all_logits else "last")
        logits = self.engine.runner.prefill(feed).logits
        assert logits is not None  # a feed that is not greedy brings back logits
        return logits if all_logits else logits[-1]

    def rollback(self, length: int) -> None:
        """Forget the tokens from position `length` on, so that the next ones appended continue
        from there (RollbackError when the sliding-window KV before `length` is gone)."""
        self.check_open()
        self.engine.runner.rollback(self.kv, length)

    def _room_for(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The ids as int32, after checking that the sequence is open and has room for them."""
        self.check_open()
        ids = self.engine.check_tokens(token_ids)
        if self.kv.length + len(ids) > self.engine.n_ctx:
            raise ContextFullError(
                f"sequence of {self.kv.length + len(ids)} tokens is longer than the context "
                f"({self.engine.n_ctx})"
            )
        return ids

    def check_open(self) -> None:
        """Raise if the sequence was closed."""
        if not self._open:
            raise Gemma4Error("sequence is closed")

    def close(self) -> None:
        """Free the sequence's slot for another sequence."""
        if self._open:
            self._open = False
            self.kv.release()

    def __enter__(self) -> GenerationSequence:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
