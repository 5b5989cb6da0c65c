"""The in-process engine's prefill of one prompt, fed in calls of each chunk size given: what an
idle `pygemma4 serve` (which prefills in calls of --prefill-chunk tokens) is measured against,
and why `pygemma4 bench MODEL -p N` (one call of all N tokens) differs from it.

    python bench/prefill_chunks.py MODEL --tokens 2009 --chunks 256,2009 --threads 2

Each chunk size gets an engine of its own; one unmeasured prefill first, then `--runs`
measured ones, each a fresh sequence taking the same random prompt (BOS, then ids drawn as the
benchmarks draw them). Prints seconds and tokens/s per run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pygemma4 import Engine
from pygemma4.benchmark.tokens import BOS, random_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=2009, help="Prompt tokens.")
    parser.add_argument("--chunks", default="256", help="Chunk sizes, comma-separated.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for chunk in (int(c) for c in args.chunks.split(",")):
        engine = Engine(
            args.model, threads=args.threads, n_ctx=args.tokens + 1, max_sequences=1, n_batch=chunk
        )
        rng = np.random.default_rng(0)
        prompt = [BOS, *random_ids(rng, engine.vocab_size, args.tokens - 1).tolist()]
        for run in range(args.runs + 1):
            with engine.new_sequence() as sequence:
                start = time.perf_counter()
                sequence.append(prompt)
                seconds = time.perf_counter() - start
            label = "warm-up" if run == 0 else f"run {run}"
            print(
                f"chunk {chunk:5d}  {label:8s}  {args.tokens} tokens in {seconds:6.2f} s  "
                f"{args.tokens / seconds:6.1f} tokens/s",
                flush=True,
            )
        del engine


if __name__ == "__main__":
    main()
