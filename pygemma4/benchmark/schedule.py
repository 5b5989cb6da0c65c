"""Whether two engines' runs interleave, or run one engine after the other.

Interleaved, both engines' processes are alive and their runs alternate, so that a change in
the machine's state (another process, the clock) falls on both. But where the two engines'
memory does not fit in the machine together, each evicts the other's pages and both are timed
reading the model back from disk. So on the CPU the runs interleave only where the estimate of
both engines' memory fits in the memory available; otherwise they are sequential: pygemma4
runs all its rounds in its process, which then stops, and llama.cpp runs all its rounds after.

The estimate, in bytes:

    file + 2 x repacked + 2 x KV

- file: the model file, which both engines map and the page cache holds once;
- repacked: the file's Q4_K and Q6_K matrices that a decode step multiplies (all but the
  gathered embedding tables), of which pygemma4 keeps an interleaved copy of the same size;
  llama.cpp's own repacked copy is counted the same;
- KV: pygemma4's KV cache for the benchmark's sequences, llama.cpp's counted the same;

against MemAvailable in /proc/meminfo (free memory and what the kernel can reclaim, the page
cache included). On CUDA the weights live in device memory: the runs interleave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gguf import GGMLQuantizationType

from pygemma4.benchmark.runners import RunnerSpec
from pygemma4.config import ModelFile
from pygemma4.kv import KvLayout
from pygemma4.model_info import decode_read_share

INTERLEAVED = "interleaved"
SEQUENTIAL = "sequential"
# The types pygemma4 keeps an interleaved copy of, for its matrix kernels.
REPACKED_TYPES = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K)


@dataclass(frozen=True)
class Schedule:
    """How two or more engines' runs are ordered, and the figures that decided it (None where
    nothing was estimated: on CUDA, or where the memory available is unknown)."""

    kind: str  # INTERLEAVED or SEQUENTIAL
    footprint_bytes: int | None  # the estimate of both engines' memory
    available_bytes: int | None  # MemAvailable when the benchmark started

    def phases(self, engines: Sequence[str]) -> list[tuple[str, ...]]:
        """The engines loaded together, one group after the other: all at once where the runs
        interleave, else one by one."""
        if self.kind == INTERLEAVED:
            return [tuple(engines)]
        return [(engine,) for engine in engines]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "footprint_bytes": self.footprint_bytes,
            "available_bytes": self.available_bytes,
        }


def repacked_bytes(model: ModelFile) -> int:
    """Bytes of the file's Q4_K and Q6_K matrices that a decode step multiplies: the size of
    pygemma4's interleaved copy of them."""
    config = model.config
    return sum(
        t.nbytes
        for t in model.gguf.tensors.values()
        if t.type_id in REPACKED_TYPES
        and decode_read_share(
            t.name, len(t.shape), config.has_output, config.n_expert_used, config.n_expert
        )
        > 0
    )


def footprint_bytes(model: ModelFile, spec: RunnerSpec) -> int:
    """The estimate of two engines' memory, each loading `model` as `spec` says (see the
    module's description)."""
    kv = KvLayout.for_model(
        model.config, spec.n_ctx, spec.max_sequences, spec.n_batch, kv_dtype=spec.kv_dtype
    ).nbytes
    return model.gguf.file_size + 2 * repacked_bytes(model) + 2 * kv


def choose_schedule(model: ModelFile, spec: RunnerSpec, available_bytes: int | None) -> Schedule:
    """Interleaved, unless on the CPU the estimate of both engines' memory exceeds
    `available_bytes` (None: unknown, interleaved)."""
    if spec.backend != "cpu" or available_bytes is None:
        return Schedule(INTERLEAVED, None, available_bytes)
    needed = footprint_bytes(model, spec)
    kind = INTERLEAVED if needed <= available_bytes else SEQUENTIAL
    return Schedule(kind, needed, available_bytes)
