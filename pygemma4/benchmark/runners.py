"""The engines a benchmark times: pygemma4's own, and llama.cpp through llama-cpp-python.

Each runner loads one GGUF and answers two timed questions on token ids it is given, so two
engines can be handed exactly the same work:

- `prefill(tokens)`: a fresh sequence takes the whole prompt in one step; the seconds until
  the logits of its last token are ready.
- `decode(steps)`: as many sequences as `steps` has rows each start from the BOS token
  (untimed); then every step feeds one token to each sequence at once and yields every
  sequence's logits; the seconds from the first step to the last.

Both compute logits for exactly the positions they are asked for and nothing else; the
tokens fed are fixed in advance (not sampled), so the engines' different numerics cannot make
them compute different sequences.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pygemma4.benchmark.tokens import BOS
from pygemma4.errors import Gemma4Error
from pygemma4.kv import KV_DTYPES, resolve_kv_dtype

ENGINES = ("pygemma4", "llamacpp")
ENGINE_TITLES = {"pygemma4": "pygemma4", "llamacpp": "llama.cpp"}


class RunnerUnavailableError(Gemma4Error, RuntimeError):
    """An engine cannot run here (llama-cpp-python not installed, no GPU offload, ...)."""


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner loads and how: the file, where it computes, the largest work it must
    hold (a prompt of `max_prompt` tokens, `max_sequences` sequences of `max_decode` steps),
    and the type of its KV cache's entries (one of pygemma4.kv.KV_DTYPES, in both engines)."""

    engine: str
    model: Path
    backend: str = "cpu"
    device: int = 0
    threads: int = 1
    max_prompt: int = 512
    max_decode: int = 128
    max_sequences: int = 1
    kv_dtype: str | None = None
    """None: pygemma4's default for the backend (set so by the constructor)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}: expected one of {ENGINES}")
        object.__setattr__(self, "kv_dtype", resolve_kv_dtype(self.kv_dtype, self.backend))
        for name in ("threads", "max_prompt", "max_decode", "max_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    @property
    def n_ctx(self) -> int:
        """Positions one sequence needs: the longest prompt, or BOS and every decode step."""
        return max(self.max_prompt, self.max_decode + 1)

    @property
    def n_batch(self) -> int:
        """Tokens one step takes at most: the longest prompt, or a token of every sequence."""
        return max(self.max_prompt, self.max_sequences)


class Runner(Protocol):
    """One engine with a model loaded."""

    def prefill(self, tokens: Sequence[int]) -> float: ...

    def decode(self, steps: np.ndarray) -> float: ...


def import_engine(engine: str) -> Any:
    """The Python module of `engine` (pygemma4.engine, or llama_cpp), imported; a runner's
    load is timed after this, so that it counts the model's loading alone."""
    if engine == "pygemma4":
        import pygemma4.engine

        return pygemma4.engine
    try:
        import llama_cpp
    except ImportError:
        raise RunnerUnavailableError(
            "llama-cpp-python is not installed (pip install llama-cpp-python)"
        ) from None
    return llama_cpp


def load_runner(spec: RunnerSpec) -> Runner:
    """Load `spec.model` in `spec.engine`; RunnerUnavailableError says why an engine cannot."""
    if spec.engine == "pygemma4":
        return Pygemma4Runner(spec)
    return LlamaCppRunner(spec)


class Pygemma4Runner:
    """pygemma4's Engine, through its public sequence API."""

    def __init__(self, spec: RunnerSpec) -> None:
        self.engine = import_engine("pygemma4").Engine(
            spec.model,
            backend=spec.backend,
            device=spec.device,
            threads=spec.threads,
            n_ctx=spec.n_ctx,
            max_sequences=spec.max_sequences,
            n_batch=spec.n_batch,
            kv_dtype=spec.kv_dtype,
        )

    def prefill(self, tokens: Sequence[int]) -> float:
        with self.engine.new_sequence() as sequence:
            start = time.perf_counter()
            sequence.append(tokens)
            return time.perf_counter() - start

    def decode(self, steps: np.ndarray) -> float:
        sequences = [self.engine.new_sequence() for _ in range(len(steps))]
        try:
            for sequence in sequences:
                sequence.append([BOS])
            start = time.perf_counter()
            for column in steps.T:
                self.engine.decode(sequences, column)
            return time.perf_counter() - start
        finally:
            for sequence in sequences:
                sequence.close()


class LlamaCppRunner:
    """llama.cpp's own C API through llama-cpp-python's bindings: one context holding
    `max_sequences` sequences, fed with explicit batches as llama-bench does (flash attention
    on; every layer on the GPU for backend "cuda", where the build can offload)."""

    def __init__(self, spec: RunnerSpec) -> None:
        llama_cpp = import_engine("llamacpp")
        self._api: Any = llama_cpp
        if spec.backend == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise RunnerUnavailableError(
                "this llama-cpp-python was built without GPU offload, so it cannot run on CUDA"
            )
        _show_llama_cpp_errors_only(llama_cpp)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = -1 if spec.backend == "cuda" else 0
        model_params.main_gpu = spec.device
        self._model = llama_cpp.llama_model_load_from_file(str(spec.model).encode(), model_params)
        if not self._model:
            raise RunnerUnavailableError(f"llama.cpp could not load {spec.model}")
        self._n_batch = spec.n_batch
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = spec.n_ctx * spec.max_sequences
        context_params.n_batch = self._n_batch
        context_params.n_ubatch = self._n_batch
        context_params.n_seq_max = spec.max_sequences
        context_params.n_threads = spec.threads
        context_params.n_threads_batch = spec.threads
        context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        context_params.type_k = context_params.type_v = KV_DTYPES[str(spec.kv_dtype)]
        context_params.no_perf = True
        self._context = llama_cpp.llama_init_from_model(self._model, context_params)
        if not self._context:
            llama_cpp.llama_model_free(self._model)
            raise RunnerUnavailableError(f"llama.cpp could not make a context for {spec.model}")
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._memory = llama_cpp.llama_get_memory(self._context)

    def close(self) -> None:
        """Free the context and the model."""
        self._api.llama_batch_free(self._batch)
        self._api.llama_free(self._context)
        self._api.llama_model_free(self._model)

    def prefill(self, tokens: Sequence[int]) -> float:
        self._api.llama_memory_clear(self._memory, True)
        positions = range(len(tokens))
        start = time.perf_counter()
        self._run(tokens, positions, [0] * len(tokens), last_only=True)
        return time.perf_counter() - start

    def decode(self, steps: np.ndarray) -> float:
        self._api.llama_memory_clear(self._memory, True)
        sequences = list(range(len(steps)))
        self._run([BOS] * len(steps), [0] * len(steps), sequences, last_only=False)
        start = time.perf_counter()
        for position, column in enumerate(steps.T, start=1):
            self._run(column.tolist(), [position] * len(steps), sequences, last_only=False)
        return time.perf_counter() - start

    def _run(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        sequences: Sequence[int],
        last_only: bool,
    ) -> None:
        """One llama_decode of the batch (token i at positions[i] of sequences[i]), with logits
        for the last token only or for every token, waited for."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, position, sequence) in enumerate(
            zip(tokens, positions, sequences, strict=True)
        ):
            batch.token[i] = int(token)
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = sequence
            batch.logits[i] = not last_only or i == len(tokens) - 1
        status = self._api.llama_decode(self._context, batch)
        if status != 0:
            raise Gemma4Error(f"llama.cpp's llama_decode failed with status {status}")
        self._api.llama_synchronize(self._context)


_GGML_LOG_LEVEL_ERROR = 4
_log_callback: Any = None  # kept alive for as long as llama.cpp may call it


def _show_llama_cpp_errors_only(llama_cpp: Any) -> None:
    """Send llama.cpp's error messages to stderr and drop the rest of its log (hundreds of
    lines per load), whose levels llama-cpp-python's own filter misreads."""
    global _log_callback
    if _log_callback is None:

        @llama_cpp.llama_log_callback
        def errors_only(level: int, text: bytes, _user_data: object) -> None:
            if level == _GGML_LOG_LEVEL_ERROR:
                sys.stderr.write(text.decode("utf-8", "replace"))

        _log_callback = errors_only
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def close_runner(runner: Runner) -> None:
    """Release what a runner holds beyond Python's reach."""
    if isinstance(runner, LlamaCppRunner):
        runner.close()


__all__ = [
    "ENGINES",
    "ENGINE_TITLES",
    "LlamaCppRunner",
    "Pygemma4Runner",
    "Runner",
    "RunnerSpec",
    "RunnerUnavailableError",
    "close_runner",
    "import_engine",
    "load_runner",
]
