"""Speed of the text path around the model: tokenizing (against llama.cpp's tokenizer on the
same GGUF) and choosing a token from a Gemma-4-sized row of logits.

    python bench/text_speed.py ../shared/fixtures/gemma4-tiny-e/model-Q8_0.gguf

Tokenizing runs over the test corpus (tests/text_corpus.py) and over one long text; sampling
times `Sampler.sample` on random logits the size of the real vocabulary (262,144). Each figure
is the median of several repetitions after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pygemma4 import SamplingParams, Tokenizer
from pygemma4.sampling import Sampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from text_corpus import corpus  # noqa: E402

GEMMA4_VOCAB = 262_144
SAMPLING_CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 1": SamplingParams(temperature=1.0),
    "top_k 40": SamplingParams(top_k=40),
    "top_p 0.9": SamplingParams(top_p=0.9),
    "min_p 0.05": SamplingParams(min_p=0.05),
    "all penalties, 2,000 tokens seen": SamplingParams(
        repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5
    ),
    "T 0.8, top_k 40, top_p 0.95, min_p 0.05, logprobs 5": SamplingParams(
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, logprobs=5
    ),
}


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Standard error closed at the file descriptor: llama.cpp warns on every prompt that
    starts with a BOS, and the corpus has such strings."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tokenizer_figures(path: Path, repeats: int) -> None:
    strings = corpus()
    long_text = " ".join(strings)
    ours = Tokenizer.from_gguf(path)
    rows = [("pygemma4", lambda s: ours.encode(s))]
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pygemma4 only")
    else:
        theirs = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        rows.append(
            ("llama.cpp", lambda s: theirs.tokenize(s.encode(), add_bos=True, special=True))
        )
    print(f"tokenize: {len(strings)} corpus strings, and one text of {len(long_text)} chars")
    for name, encode in rows:
        with quiet_stderr():
            each = median_seconds(lambda encode=encode: [encode(s) for s in strings], repeats)
            whole = median_seconds(lambda encode=encode: encode(long_text), repeats)
        print(
            f"  {name:<10} {each / len(strings) * 1e6:8.1f} us per corpus string   "
            f"{len(long_text) / whole / 1e6:6.2f} M chars/s on the long text"
        )


def sampling_figures(repeats: int) -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(GEMMA4_VOCAB) * 3).astype(np.float32)
    seen = rng.integers(0, GEMMA4_VOCAB, 2000).tolist()
    print(f"Sampler.sample on {GEMMA4_VOCAB} logits (median of {repeats} x 100 calls)")
    for name, params in SAMPLING_CASES.items():
        sampler = Sampler(params, prompt_ids=seen)
        for token in seen[:200]:
            sampler.accept(token)
        seconds = median_seconds(lambda s=sampler: [s.sample(logits) for _ in range(100)], repeats)
        print(f"  {name:<55} {seconds / 100 * 1e3:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a Gemma 4 GGUF (its tokenizer is used)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer_figures(args.model, args.repeats)
    sampling_figures(args.repeats)


if __name__ == "__main__":
    main()
