"""The KV pool of the synthetic E4B (E4B's shapes) for 8 sequences of 32K tokens, per KV entry
type: the size the bytes per entry predict (pygemma4.kv.KvFootprint), the size the core lays
out, and, for the types asked with --touch, the memory the pool really takes once every byte of
it is written (the growth of this process's resident set). Then the context per sequence that
`serve` gives E4B by default (its KV budget, a share of the memory available) with f16 entries.

    python bench/kv_memory.py [--touch f16,q8_0] [--available 16GiB]

bench/RESULTS.md holds what it printed on the development machine.
"""

from __future__ import annotations

import argparse
import mmap
import os

from pygemma4.config import open_model
from pygemma4.kv import KV_DTYPES, KvFootprint, KvLayout
from pygemma4.memory import MemoryBudget, memory_available_bytes
from pygemma4.models.synthetic import synthetic_model_path
from pygemma4.workers.server import DEFAULT_KV_FRACTION

SEQUENCES = 8
CONTEXT = 32 * 1024
CHUNK = 256  # serve's default --prefill-chunk
TOUCH_STEP = 64 << 20


def resident_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def touched_growth(layout: KvLayout, config: object) -> int:
    """How much the resident set grows when a pool of `layout` is made in fresh memory and
    every byte of that memory is written."""
    memory = mmap.mmap(-1, layout.nbytes)
    pool = layout.new_pool(config, memory)  # the pool over exactly this memory
    ones = b"\x01" * TOUCH_STEP
    before = resident_bytes()
    for start in range(0, layout.nbytes, TOUCH_STEP):
        end = min(layout.nbytes, start + TOUCH_STEP)
        memory[start:end] = ones[: end - start]
    grown = resident_bytes() - before
    del pool
    memory.close()
    return grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--touch", default="f16,q8_0", help="types whose pool is written whole")
    parser.add_argument(
        "--available", help="memory available to size serve's default by [default: MemAvailable]"
    )
    args = parser.parse_args()
    config = open_model(synthetic_model_path("e4b")).config
    gib = 2**30
    print(f"synthetic E4B: {SEQUENCES} sequences x {CONTEXT} tokens, 16 ring sets (serve's)")
    for kv_dtype in KV_DTYPES:
        layout = KvLayout.for_model(
            config,
            CONTEXT,
            2 * SEQUENCES,  # a ring set per sequence and one per prefix snapshot, as serve
            CHUNK,
            n_blocks=SEQUENCES * CONTEXT // 16,
            kv_dtype=kv_dtype,
        )
        footprint = KvFootprint.of(config, kv_dtype)
        line = (
            f"{kv_dtype:>5}: full {footprint.full_bytes_per_token} B/token "
            f"({footprint.full_layers} layers), sliding {footprint.sliding_bytes_per_token} "
            f"B/token ({footprint.sliding_layers} layers, rings of "
            f"{layout.ring_blocks * layout.block_size}); predicted "
            f"{footprint.predicted_bytes(layout) / gib:.3f} GiB, laid out "
            f"{layout.nbytes / gib:.3f} GiB"
        )
        if kv_dtype in args.touch.split(","):
            grown = touched_growth(layout, config)
            line += f", measured (RSS growth, written whole) {grown / gib:.3f} GiB"
        print(line, flush=True)
    available = (
        MemoryBudget.parse(args.available).resolve(None)
        if args.available
        else memory_available_bytes()
    )
    if available is None:
        return
    budget = int(available * DEFAULT_KV_FRACTION)
    for kv_dtype in ("f32", "f16", "q8_0"):
        layout = KvLayout.for_memory(
            config, budget, 2 * SEQUENCES, CHUNK, SEQUENCES * config.n_ctx_train, kv_dtype=kv_dtype
        )
        positions = layout.n_blocks * layout.block_size
        print(
            f"serve's default on E4B, {available / gib:.1f} GiB available, KV {kv_dtype}: budget "
            f"{budget / gib:.2f} GiB holds {positions} positions; context per sequence "
            f"{min(config.n_ctx_train, positions)}"
        )


if __name__ == "__main__":
    main()
