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


def test_running_sequences_keep_decoding_while_a_long_prompt_is_prefilled(
    demo_model_file: Path, tmp_path: Path
):
    # Each step carries the running sequence's next token and 16 tokens of the long prompt:
    # the running sequence's 24 tokens come in 24 steps, the long prompt's first token only
    # after its 63 chunks, and both are the engine's tokens.
    engine = Engine(demo_model_file, threads=1)
    rng = np.random.default_rng(5)
    short = [2, 40, 41, 42]
    long = [2, *rng.integers(300, 600, 1000).tolist()]
    expected = [engine.generate(p, 24, stop_tokens=()) for p in (short, long)]
    args = ("--threads", "1", "--prefill-chunk", "16")
    with ServeProcess.running(demo_model_file, tmp_path, *args) as server:

        async def run() -> tuple[list[str], list[list[int]]]:
            events: list[str] = []
            async with AsyncClient(server.endpoint, timeout=120) as client:

                async def one(name: str, prompt: list[int], started: asyncio.Event) -> list[int]:
                    tokens = []
                    async for chunk in client.stream(prompt, 24, temperature=0, ignore_eos=True):
                        if not tokens:
                            events.append(f"{name} first")
                            started.set()
                        tokens += chunk.token_ids
                    events.append(f"{name} done")
                    return tokens

                running, waiting = asyncio.Event(), asyncio.Event()
                first = asyncio.create_task(one("short", short, running))
                await running.wait()
                second = asyncio.create_task(one("long", long, waiting))
                return events, [await first, await second]

        events, got = asyncio.run(run())
        assert got == expected
        assert events == ["short first", "short done", "long first", "long done"]
