"""The cost of verifying several drafted tokens at once, against one decode step.

Speculative decoding appends the k proposed tokens and the last accepted one to a sequence in
one forward call that brings back the logits of every row. Decode streams every weight once per
call whatever the row count, so such a call should cost little more than appending one token.
`verification_costs` measures it: one sequence holding `context` positions, calls of each of
`token_counts` tokens (every row's logits returned, as verification reads them), each call
rolled back afterwards so that all of them append at the same length; the counts' calls
alternate, so that a change in the machine's state falls on all of them.

    python -m pygemma4.benchmark.verify_cost --synthetic e4b --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pygemma4.benchmark.tokens import BOS, random_ids
from pygemma4.config import open_model
from pygemma4.errors import require_positive
from pygemma4.kv import BlockAllocator, KvLayout, SequenceKv
from pygemma4.runner import Feed, ModelRunner, default_threads, pool_device


@dataclass(frozen=True)
class VerificationCost:
    """Calls appending `tokens` tokens: the median seconds of one, and its ratio to the median
    of one token's."""

    tokens: int
    seconds: float
    ratio: float


def verification_costs(
    model_path: str | Path,
    threads: int | None = None,
    token_counts: Sequence[int] = (1, 2, 3, 5, 8),
    context: int = 128,
    repetitions: int = 7,
    warmup: int = 1,
    backend: str = "cpu",
    device: int = 0,
    seed: int = 0,
) -> dict[int, VerificationCost]:
    """The cost of one call appending each of `token_counts` tokens (1 is always measured, as
    the reference) to a sequence of `context` positions, by count: `warmup` unmeasured rounds,
    then the median of `repetitions` rounds, each round one call of every count."""
    threads = default_threads() if threads is None else threads
    for name, value in (("threads", threads), ("context", context), ("repetitions", repetitions)):
        require_positive(name, value)
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, not {warmup}")
    if any(n < 1 for n in token_counts):
        raise ValueError(f"each token count must be at least 1, not {list(token_counts)}")
    counts = sorted({1, *token_counts})
    model_file = open_model(model_path)
    config = model_file.config
    n_batch = max(context, counts[-1])
    layout = KvLayout.for_model(config, context + counts[-1], 1, n_batch)
    runner = ModelRunner(
        model_file,
        layout.new_pool(config, device=pool_device(backend, device)),
        n_batch,
        threads,
        backend,
        device,
    )
    kv = SequenceKv(BlockAllocator(layout))
    rng = np.random.default_rng(seed)
    prompt = np.concatenate([[BOS], random_ids(rng, config.vocab_size, context - 1)])
    runner.prefill(Feed(kv, prompt.astype(np.int32), "none"))
    drafted = random_ids(rng, config.vocab_size, counts[-1])
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    for round_ in range(warmup + repetitions):
        for n in counts:
            start = time.perf_counter()
            runner.decode([Feed(kv, drafted[:n], "all")])
            elapsed = time.perf_counter() - start
            runner.rollback(kv, context)
            if round_ >= warmup:
                seconds[n].append(elapsed)
    medians = {n: statistics.median(values) for n, values in seconds.items()}
    return {n: VerificationCost(n, medians[n], medians[n] / medians[1]) for n in counts}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pygemma4.benchmark.verify_cost",
        description="The cost of appending several tokens in one call against one token.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", help="a Gemma 4 GGUF")
    source.add_argument("--synthetic", help="a synthetic model (e2b, e4b, ...) from the cache")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", default="1,2,3,5,8", help="token counts, comma-separated")
    parser.add_argument("--context", type=int, default=128, help="positions held before")
    parser.add_argument("-r", "--repetitions", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    if args.synthetic is not None:
        from pygemma4.models.synthetic import synthetic_model_path

        path = synthetic_model_path(args.synthetic)
    else:
        path = Path(args.model)
    costs = verification_costs(
        path,
        args.threads,
        [int(n) for n in args.tokens.split(",")],
        args.context,
        args.repetitions,
        args.warmup,
        args.backend,
    )
    print(f"{path.name}: {args.context} positions before, median of {args.repetitions}")
    print("tokens  ms per call  vs 1 token")
    for cost in costs.values():
        print(f"{cost.tokens:>6}  {cost.seconds * 1e3:>11.1f}  {cost.ratio:>9.2f}x")


if __name__ == "__main__":
    main()
