"""The decode worker's scheduling of KV memory: sequences take blocks as they grow rather than
for their whole length up front; when the pool runs dry the youngest are paused and resumed,
never failed; a request longer than the pool holds is refused with the numbers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import ServeProcess

from pygemma4 import AsyncClient, Engine
from pygemma4.client import ServerError

CLIENTS = 64
OUTPUT = 48


def test_64_long_requests_on_a_small_pool_all_complete_with_the_engines_tokens(
    demo_model_file: Path, tmp_path: Path
):
    rng = np.random.default_rng(3)
    prompts = [[2, *rng.integers(300, 600, int(n)).tolist()] for n in rng.integers(20, 60, CLIENTS)]
    engine = Engine(demo_model_file, threads=1, prefix_snapshots=0)
    expected = [engine.generate(p, OUTPUT, stop_tokens=()) for p in prompts]
    # 40 blocks of 16 positions: 16 sequences at once need up to 100 blocks each step.
    args = ("--threads", "1", "--max-batch", "16", "--kv-tokens", "640")
    with ServeProcess.running(demo_model_file, tmp_path, *args) as server:

        async def run() -> list[list[int]]:
            async with AsyncClient(server.endpoint, timeout=120) as client:

                async def one(prompt: list[int]) -> list[int]:
                    stream = client.stream(prompt, OUTPUT, temperature=0, ignore_eos=True)
                    return [t async for chunk in stream for t in chunk.token_ids]

                return list(await asyncio.gather(*(one(p) for p in prompts)))

        got = asyncio.run(run())
        assert got == expected
        with server.client() as client:
            health = client.health()
            assert health.requests_in_flight == 0 and health.kv_blocks_used == 0
            # The pool could not hold them all at once: some were paused and resumed, and
            # resumed ones took their KV from the prefix cache.
            assert health.prefix_hit > 0


def test_a_request_that_can_never_fit_is_refused_with_the_numbers(
    demo_model_file: Path, tmp_path: Path
):
    # The context is what the pool holds (256 positions): a longer request is refused.
    args = ("--threads", "1", "--kv-tokens", "256")
    with (
        ServeProcess.running(demo_model_file, tmp_path, *args) as server,
        server.client() as client,
    ):
        with pytest.raises(
            ServerError, match=r"300 exceeds the context of 256 tokens \(at most 157"
        ):
            client.complete([2] * 100, 300, ignore_eos=True)
        assert client.complete([2] * 100, 8, temperature=0).completion_tokens >= 1
