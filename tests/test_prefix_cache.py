"""Prefix reuse: logits computed through a cached prefix equal a cold computation bit for bit on
every fixture model and KV entry type, for prefixes ending before, at and after the sliding
window's edge (the ring snapshots copied whole, whatever the bytes per entry); shared
blocks are counted, kept while used and evicted least recently used; a snapshot whose ring no
longer holds the window is not used; the engine reuses what earlier generations computed."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import ServeProcess, free_port

from pygemma4 import Engine, open_model
from pygemma4.kv import KV_DTYPES, BlockAllocator, KvExhaustedError, KvLayout, SequenceKv
from pygemma4.prefix_cache import PrefixCache, block_names
from pygemma4.runner import Feed, ModelRunner

BLOCK = 4  # small blocks, so that a cached prefix can end before the window's edge (16)
N_BATCH = 64


def fixture_models(fixtures_dir: Path) -> list[Path]:
    return [
        *sorted((fixtures_dir / "gemma4-tiny-e").glob("model-*.gguf")),
        *sorted((fixtures_dir / "gemma4-tiny-moe").glob("model-*.gguf")),
        fixtures_dir / "gemma4-tiny-draft" / "target-f32.gguf",
    ]


def setup(path: Path, snapshots: int = 2, n_ctx: int = 256, kv_dtype: str = "f16"):
    model_file = open_model(path)
    layout = KvLayout.for_model(
        model_file.config, n_ctx, 2 + snapshots, N_BATCH, BLOCK, kv_dtype=kv_dtype
    )
    pool = layout.new_pool(model_file.config)
    runner = ModelRunner(model_file, pool, N_BATCH, 1)
    allocator = BlockAllocator(layout)
    return runner, allocator, PrefixCache(allocator, pool, model_file.config, snapshots)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_logits_through_a_cached_prefix_equal_a_cold_computation(fixtures_dir, kv_dtype):
    for path in fixture_models(fixtures_dir):
        runner, allocator, cache = setup(path, kv_dtype=kv_dtype)
        window = runner.config.sliding_window
        rng = np.random.default_rng(0)
        vocab = runner.config.vocab_size
        first = rng.integers(10, vocab, 60).astype(np.int32)
        kv, hit = cache.new_sequence(first)
        assert hit == 0
        runner.prefill(Feed(kv, first, "none"))
        cache.release(kv, first)
        for prefix in (window - BLOCK, window, window + BLOCK, 40):
            prompt = np.concatenate([first[:prefix], rng.integers(10, vocab, 9).astype(np.int32)])
            kv, hit = cache.new_sequence(prompt)
            cold = SequenceKv(allocator)
            try:
                assert hit == prefix, (path.name, prefix)
                got = runner.prefill(Feed(kv, prompt[hit:], "all")).logits
                want = runner.prefill(Feed(cold, prompt, "all")).logits
                assert np.array_equal(got, want[hit:]), (path.name, prefix)
            finally:
                cold.release()
                cache.release(kv, prompt)
        assert cache.stats.hit == sum((window - BLOCK, window, window + BLOCK, 40))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_a_snapshot_whose_ring_lost_the_window_is_not_used(fixtures_dir, kv_dtype):
    runner, allocator, cache = setup(
        fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf", kv_dtype=kv_dtype
    )
    ring_positions = runner.pool.ring_blocks * BLOCK
    rng = np.random.default_rng(1)
    long = rng.integers(10, runner.config.vocab_size, 3 * ring_positions).astype(np.int32)
    kv, _ = cache.new_sequence(long)
    runner.prefill(Feed(kv, long, "none"))
    cache.release(kv, long)
    # Its full blocks are all cached, but its ring holds only its last positions: a prompt
    # sharing its beginning takes nothing; one sharing (nearly) all of it takes the end.
    early = np.concatenate([long[:16], [5, 6, 7]]).astype(np.int32)
    kv, hit = cache.new_sequence(early)
    assert hit == 0
    cache.release(kv, early)
    late = np.concatenate([long[:-2], [5, 6, 7]]).astype(np.int32)
    kv, hit = cache.new_sequence(late)
    assert hit == (len(long) - 2) // BLOCK * BLOCK
    cold = SequenceKv(allocator)
    try:
        got = runner.prefill(Feed(kv, late[hit:], "all")).logits
        want = runner.prefill(Feed(cold, late, "all")).logits
        assert np.array_equal(got, want[hit:])
    finally:
        cold.release()
        cache.release(kv, late)


def test_shared_blocks_are_counted_kept_while_used_and_evicted_least_recently_used(fixtures_dir):
    config = open_model(fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf").config
    layout = KvLayout.for_model(config, 32, 1, 8, BLOCK, n_blocks=6)
    allocator = BlockAllocator(layout)
    names = block_names(np.arange(24), BLOCK)
    held = allocator.allocate(3)
    for block, name in zip(held, names, strict=False):
        allocator.register(block, name)
    assert allocator.share(names[:2] + [b"other"]) == held[:2]  # the run stops at a miss
    assert allocator.share([b"other", names[0]]) == []
    allocator.free(held)  # the owner lets go: blocks 0 and 1 are still shared once
    assert allocator.free_blocks == 3 + 1
    allocator.free(held[:2])
    assert allocator.free_blocks == 6 and allocator.cached_blocks == 3
    with pytest.raises(ValueError, match="freed twice"):
        allocator.free(held[:1])
    # Unused blocks are handed out first, then cached ones, least recently used first.
    fresh = allocator.allocate(3)
    assert set(fresh).isdisjoint(held)
    assert allocator.share(names[2:3]) == held[2:3]  # held[2] used again: now the newest
    allocator.free(held[2:3])
    assert allocator.allocate(1) == held[:1]
    assert allocator.share(names[:1]) == []  # evicted, forgotten
    assert allocator.cached_blocks == 2
    with pytest.raises(KvExhaustedError, match="3 KV blocks wanted, 2 of 6 free"):
        allocator.allocate(3)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_a_sequence_that_runs_out_of_ring_sets_takes_a_snapshots(fixtures_dir, kv_dtype):
    runner, allocator, cache = setup(
        fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf", 1, kv_dtype=kv_dtype
    )
    tokens = np.arange(10, 30, dtype=np.int32)
    kv, _ = cache.new_sequence(tokens)
    runner.prefill(Feed(kv, tokens, "none"))
    cache.release(kv, tokens)
    assert len(cache.snapshots) == 1
    # Two sequences and the snapshot take the three ring sets; a third sequence takes the
    # snapshot's, a fourth finds none.
    held = [cache.new_sequence(tokens)[0] for _ in range(3)]
    assert len(cache.snapshots) == 0
    with pytest.raises(KvExhaustedError, match="ring set"):
        cache.new_sequence(tokens)
    for kv in held:
        kv.release()


def test_copying_a_ring_set_is_checked(fixtures_dir):
    runner, _, _ = setup(fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf")
    with pytest.raises(ValueError, match="ring set 9 out of range"):
        runner.pool.copy_ring_set(0, 9)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_the_engine_reuses_what_earlier_generations_computed(fixtures_dir, kv_dtype):
    path = fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf"
    prompt = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")["ids1"]
    cached = Engine(path, threads=1, kv_dtype=kv_dtype)
    cold = Engine(path, threads=1, prefix_snapshots=0, kv_dtype=kv_dtype)
    first = cached.generate(prompt, 24, stop_tokens=())
    assert cached.prefix_cache.stats.hit == 0
    assert (
        cached.generate(prompt, 24, stop_tokens=())
        == first
        == cold.generate(prompt, 24, stop_tokens=())
    )
    whole_blocks = (len(prompt) - 1) // 16 * 16
    assert cached.prefix_cache.stats.hit == whole_blocks
    # The next turn of a chat: the earlier prompt and reply, then more.
    turn = np.concatenate([prompt, first, prompt[1:30]])
    assert cached.generate(turn, 16, stop_tokens=()) == cold.generate(turn, 16, stop_tokens=())
    assert cached.prefix_cache.stats.hit >= whole_blocks + len(prompt) + len(first) - 16
    assert cold.prefix_cache.stats.hit == 0


def test_the_server_reuses_prefixes_and_reports_them(fixtures_dir, tmp_path):
    path = fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf"
    prompt = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")["ids1"].tolist()
    engine = Engine(path, threads=1, prefix_snapshots=0)
    listen = f"127.0.0.1:{free_port()}"
    with (
        ServeProcess.running(path, tmp_path, "--threads", "1", "--http", listen) as server,
        server.client() as client,
    ):
        first = client.complete(prompt, 12, temperature=0, ignore_eos=True)
        assert first.cached_tokens == 0
        again = client.complete(prompt, 12, temperature=0, ignore_eos=True)
        assert again.cached_tokens == (len(prompt) - 1) // 16 * 16
        assert again.token_ids == first.token_ids
        assert list(first.token_ids) == engine.generate(prompt, 12, stop_tokens=())
        # The next turn: the whole first exchange is cached but its last block.
        turn = [*prompt, *first.token_ids, *prompt[1:20]]
        streamed = client.stream(turn, 8, temperature=0, ignore_eos=True)
        tokens = [t for chunk in streamed for t in chunk.token_ids]
        assert streamed.result is not None
        assert streamed.result.cached_tokens >= len(prompt) + len(first.token_ids) - 16
        assert tokens == engine.generate(turn, 8, stop_tokens=())
        health = client.health()
        assert health.prefix_hit == again.cached_tokens + streamed.result.cached_tokens
        body = {"model": path.name, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        usage = httpx.post(f"http://{listen}/v1/completions", json=body, timeout=60).json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == again.cached_tokens
        metrics = httpx.get(f"http://{listen}/metrics", timeout=60).text
        hits = next(
            line
            for line in metrics.splitlines()
            if line.startswith("pygemma4:prefix_cache_hits_total")
        )
        assert float(hits.split()[1]) == health.prefix_hit + again.cached_tokens
