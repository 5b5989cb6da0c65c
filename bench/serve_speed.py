"""Aggregate decode speed of `pygemma4 serve` with 1 and with N concurrent streams.

    python bench/serve_speed.py [MODEL.gguf] [--streams 1 8] [--max-tokens 64] [--threads 2]
        [--prefill-threads 1] [--runs 3]

Starts a server on the model (the demo model without one), then for each stream count runs
that many greedy completions at once, all of the same length (end-of-generation ignored), after
one warm-up round. Aggregate tokens/s is the tokens of all streams over the wall time from the
first request sent to the last reply; the speed-up is against one stream. Mean ± standard
deviation over --runs rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from pygemma4 import AsyncClient


async def one_round(endpoint: str, streams: int, prompt: list[int], max_tokens: int) -> float:
    """Aggregate generated tokens/s of `streams` concurrent completions."""
    clients = [AsyncClient(endpoint, timeout=600) for _ in range(streams)]
    try:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(c.complete(prompt, max_tokens, ignore_eos=True, temperature=0) for c in clients)
        )
        elapsed = time.perf_counter() - start
    finally:
        for c in clients:
            await c.close()
    assert all(r.completion_tokens == max_tokens for r in results)
    return streams * max_tokens / elapsed


def start_server(model: str | None, endpoint: str, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "pygemma4", "serve", *([model] if model else [])]
    command += ["--endpoint", endpoint, "--threads", str(args.threads)]
    command += ["--max-batch", str(max(args.streams))]
    command += ["--prefill-threads", str(args.prefill_threads or args.threads)]
    # From the root, so that a source checkout in the working directory does not shadow the
    # installed package with its compiled core.
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd="/")
    line = server.stdout.readline()  # type: ignore[union-attr]
    if "serving" not in line:
        server.kill()
        sys.exit(f"the server did not start: {line!r}")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prefill-threads", type=int, help="[default: --threads]")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='pygemma4-bench-')}/serve"
    server = start_server(args.model, endpoint, args)
    prompt = [2] + [(97 + 31 * i) % 200 + 3 for i in range(args.prompt - 1)]
    try:
        base = None
        print(f"{'streams':>8} {'tokens/s (all streams)':>24} {'speed-up':>9}")
        for streams in args.streams:
            asyncio.run(one_round(endpoint, streams, prompt, args.max_tokens))  # warm-up
            rates = [
                asyncio.run(one_round(endpoint, streams, prompt, args.max_tokens))
                for _ in range(args.runs)
            ]
            mean = statistics.mean(rates)
            spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
            base = mean if base is None else base
            print(f"{streams:>8} {mean:>15.1f} ± {spread:<6.1f} {mean / base:>8.2f}×")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
