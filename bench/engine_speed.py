"""Prefill and decode speed of pygemma4 on a GGUF, beside llama.cpp on the same file.

    python bench/engine_speed.py MODEL.gguf [--threads 2] [--prompt 64] [--decode 32] [--runs 3]

Both engines get the same prompt tokens and thread count; one warm-up run is excluded and the
mean ± standard deviation over --runs runs is printed. llama.cpp runs through llama-cpp-python
(flash attention on, as its defaults on CPU) where it is installed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from pygemma4 import Engine


def pygemma4_run(engine: Engine, prompt: list[int], n_decode: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy run."""
    with engine.new_sequence() as seq:
        start = time.perf_counter()
        token = int(seq.append(prompt).argmax())
        prefilled = time.perf_counter()
        for _ in range(n_decode):
            token = int(seq.append([token]).argmax())
        return prefilled - start, time.perf_counter() - prefilled


def llama_cpp_runner(
    path: str, threads: int, n_ctx: int
) -> Callable[[list[int], int], tuple[float, float]] | None:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp figures skipped")
        return None
    model = llama_cpp.Llama(
        path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, flash_attn=True, verbose=False
    )

    def run(prompt: list[int], n_decode: int) -> tuple[float, float]:
        model.reset()
        start = time.perf_counter()
        model.eval(prompt)
        prefilled = time.perf_counter()
        for _ in range(n_decode):
            model.eval([int(np.argmax(model.scores[model.n_tokens - 1]))])
        return prefilled - start, time.perf_counter() - prefilled

    return run


def report(name: str, runs: list[tuple[float, float]], n_prompt: int, n_decode: int) -> None:
    prefill = [n_prompt / p for p, _ in runs]
    decode = [n_decode / d for _, d in runs]
    print(
        f"{name:<10} prefill {statistics.mean(prefill):8.1f} ± {statistics.pstdev(prefill):5.1f} "
        f"tokens/s   decode {statistics.mean(decode):7.2f} ± {statistics.pstdev(decode):4.2f} "
        f"tokens/s   ({len(runs)} runs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    n_ctx = args.prompt + args.decode + 1
    engine = Engine(args.model, threads=args.threads, n_ctx=n_ctx, n_batch=args.prompt)
    rng = np.random.default_rng(0)
    prompt = [2, *rng.integers(7, engine.vocab_size, size=args.prompt - 1).tolist()]
    engines: dict[str, Callable[[list[int], int], tuple[float, float]]] = {
        "pygemma4": lambda p, n: pygemma4_run(engine, p, n)
    }
    llama = llama_cpp_runner(args.model, args.threads, n_ctx)
    if llama is not None:
        engines["llama.cpp"] = llama
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for run in engines.values():
        run(prompt, args.decode)  # warm-up
    for _ in range(args.runs):  # interleaved, so both see the same machine state
        for name, run in engines.items():
            results[name].append(run(prompt, args.decode))
    print(
        f"{args.model}: {args.prompt}-token prompt, {args.decode} decoded, {args.threads} threads"
    )
    for name, runs in results.items():
        report(name, runs, args.prompt, args.decode)


if __name__ == "__main__":
    main()
