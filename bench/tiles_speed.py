"""Speed of the CPU backend's tiled products at the vision tower's shapes: float-weight matmuls
(the register tiles of quant/float_tiles.h) and dense attention (the panel kernel of
ops/cpu/panel_kernel.h), as multiply-adds per second against the machine's peak.

    python bench/tiles_speed.py [--tokens 2394] [--threads 2] [--repetitions 5] \
        [--peak-gfma 117]

Each figure is the best of the repetitions after a warm-up, in wall time. The peak is the
caller's to state (default: 2 Zen 4 cores at about 3.67 GHz, one 16-lane FMA per cycle each).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from gguf import GGMLQuantizationType as T

from pygemma4 import _core

WIDTH, FFN, HEADS, HEAD_DIM = 768, 3072, 12, 64


def best_seconds(run: Callable[[], object], repetitions: int) -> float:
    run()
    best = float("inf")
    for _ in range(repetitions):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def float_weights(rng: np.random.Generator, qtype: T, rows: int, cols: int) -> np.ndarray:
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    return (values.astype(np.float16) if qtype == T.F16 else values).view(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2394)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--peak-gfma", type=float, default=117.0)
    args = parser.parse_args()
    ops = _core.OpsCheck("cpu", threads=args.threads)
    rng = np.random.default_rng(0)
    n = args.tokens
    print(f"{n} tokens, {args.threads} threads, peak {args.peak_gfma:g} GFMA/s")
    for qtype in (T.F16, T.F32):
        for rows, cols in ((WIDTH, WIDTH), (FFN, WIDTH), (WIDTH, FFN)):
            w = float_weights(rng, qtype, rows, cols)
            x = rng.standard_normal((n, cols)).astype(np.float32)
            product = partial(ops.matmul, int(qtype), w, cols, rows, x)
            seconds = best_seconds(product, args.repetitions)
            gfma = rows * cols * n / seconds / 1e9
            print(
                f"matmul {qtype.name} {rows}x{cols} x {n}: {seconds * 1e3:.1f} ms, "
                f"{gfma:.1f} GFMA/s ({gfma / args.peak_gfma:.0%} of peak)"
            )
    q, k, v = (rng.standard_normal((n, HEADS * HEAD_DIM)).astype(np.float32) for _ in range(3))
    seconds = best_seconds(
        lambda: ops.attention_dense(q, k, v, HEADS, HEADS, HEAD_DIM, HEAD_DIM**-0.5),
        args.repetitions,
    )
    gfma = 2 * n * n * HEAD_DIM * HEADS / seconds / 1e9
    print(
        f"attention_dense {HEADS} heads of {HEAD_DIM} x {n}: {seconds * 1e3:.1f} ms, "
        f"{gfma:.1f} GFMA/s ({gfma / args.peak_gfma:.0%} of peak)"
    )


if __name__ == "__main__":
    main()
