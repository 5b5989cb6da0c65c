"""The core's KV pool and the model's forward over it: external (shared) memory, block tables
and ring sets from the caller, and the checks that keep untrusted tables from corrupting memory."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from pygemma4 import Engine, _core, open_model
from pygemma4.kv import KvLayout
from pygemma4.runner import ForwardBatch

MODEL = "gemma4-tiny-e/model-Q4_K_M.gguf"
MOE_MODEL = "gemma4-tiny-moe/model-Q4_K_M.gguf"
N_BATCH = 48


@pytest.fixture(scope="module")
def engine(fixtures_dir) -> Engine:
    """The core model comes from an engine (engine.runner.model); the tests bring their own
    pools."""
    return Engine(fixtures_dir / MODEL, threads=2, n_ctx=128, n_batch=N_BATCH)


@pytest.fixture(scope="module")
def layout(engine) -> KvLayout:
    return KvLayout.for_model(engine.config, 128, 3, N_BATCH, block_size=4)


@pytest.fixture(scope="module")
def prompt(fixtures_dir) -> np.ndarray:
    return np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")["ids1"][:40].astype(np.int32)


def run(engine, pool, seqs_tokens, starts, tables, ring_sets, outputs="last"):
    """One forward call: sequence i feeds seqs_tokens[i] from position starts[i]; returns the
    logits of every sequence's last row (outputs="last") or of no row (None)."""
    tokens = np.concatenate(seqs_tokens).astype(np.int32)
    positions = np.concatenate(
        [np.arange(s, s + len(t), dtype=np.int32) for s, t in zip(starts, seqs_tokens, strict=True)]
    )
    seqs = np.repeat(np.arange(len(seqs_tokens), dtype=np.int32), [len(t) for t in seqs_tokens])
    rows = np.cumsum([len(t) for t in seqs_tokens], dtype=np.int32) - 1
    return forward(
        engine,
        pool,
        tokens,
        positions,
        seqs,
        tables,
        ring_sets,
        rows if outputs == "last" else [],
    )


def forward(engine, pool, tokens, positions, seqs, tables, ring_sets, logit_rows, argmax_rows=()):
    """The core's forward over a batch of these arrays; the logits of `logit_rows`."""
    batch = ForwardBatch(tokens, positions, seqs, tables, ring_sets, logit_rows, argmax_rows, ())
    return engine.runner.model.forward(pool, batch)[0]


def table(blocks, width=32):
    return np.pad(np.asarray(blocks, dtype=np.int32), (0, width - len(blocks)), constant_values=-1)


def test_pool_properties_and_size(engine, layout):
    pool = layout.new_pool(engine.config)
    assert (pool.block_size, pool.n_blocks, pool.n_ring_sets, pool.ring_blocks) == (
        layout.block_size,
        layout.n_blocks,
        layout.n_ring_sets,
        layout.ring_blocks,
    )
    assert pool.nbytes == layout.nbytes
    # Every KV-owning layer's K and V stores, each rounded up to 64 bytes.
    expected = 0
    for layer in engine.config.layers:
        if layer.has_kv:
            blocks = layout.n_ring_sets * layout.ring_blocks if layer.is_sliding else 3 * 32
            store = blocks * layout.block_size * layer.n_head_kv * layer.head_dim * 4
            expected += 2 * (-(-store // 64) * 64)
    assert pool.nbytes == expected


def test_pool_in_a_buffer_that_is_too_small_or_read_only(engine, layout):
    with pytest.raises(ValueError, match=f"needs {layout.nbytes} bytes"):
        layout.new_pool(engine.config, bytearray(layout.nbytes - 1))
    with pytest.raises(ValueError, match="writable"):
        layout.new_pool(engine.config, bytes(layout.nbytes))
    with pytest.raises(ValueError, match="at least 1"):
        _core.KvPool(engine.config, 0, 4, 1, 1)
    with pytest.raises(ValueError, match="at least 1"):
        _core.KvPool.bytes_needed(engine.config, 16, 4, 1, -1)
    with pytest.raises(ValueError, match="too large"):
        _core.KvPool.bytes_needed(engine.config, 2**31 - 1, 2**31 - 1, 1, 1)


def test_pools_sharing_one_buffer_see_each_others_kv(engine, layout, prompt):
    private = layout.new_pool(engine.config)
    prefill = [prompt[:-1]], [0], [table(range(10))], [1]
    run(engine, private, *prefill, outputs=None)
    want = run(engine, private, [prompt[-1:]], [len(prompt) - 1], [table(range(10))], [1])
    for buffer in (bytearray(layout.nbytes), np.zeros(layout.nbytes, np.uint8)):
        # One pool writes the prompt, another over the same memory continues it, as a server's
        # prefill and decode processes do over a shared mapping.
        writer = layout.new_pool(engine.config, buffer)
        reader = layout.new_pool(engine.config, buffer)
        run(engine, writer, *prefill, outputs=None)
        got = run(engine, reader, [prompt[-1:]], [len(prompt) - 1], [table(range(10))], [1])
        np.testing.assert_array_equal(got, want)


def test_a_pool_holds_its_buffer(engine, layout):
    memory = mmap.mmap(-1, layout.nbytes)
    pool = layout.new_pool(engine.config, memory)
    with pytest.raises(BufferError):
        memory.close()  # the pool still points into it
    grown = bytearray(layout.nbytes)
    other = layout.new_pool(engine.config, grown)
    with pytest.raises(BufferError):
        grown.extend(b"0")
    del pool, other
    memory.close()
    grown.extend(b"0")


def test_a_mixed_call_gives_each_row_what_it_gets_alone(engine, layout, prompt):
    """A prompt chunk of one sequence beside decode steps of two others, in one call."""
    tables = [table(range(0, 10)), table(range(10, 20)), table(range(20, 30))]
    alone = layout.new_pool(engine.config)
    mixed = layout.new_pool(engine.config)
    for pool in (alone, mixed):
        run(engine, pool, [prompt[:20], prompt[5:30]], [0, 0], tables[1:], [0, 1], outputs=None)
    want = [
        run(engine, alone, [prompt[20:36]], [0], tables[:1], [2])[0],
        run(engine, alone, [prompt[30:31]], [20], tables[1:2], [0])[0],
        run(engine, alone, [prompt[31:32]], [25], tables[2:], [1])[0],
    ]
    got = run(
        engine,
        mixed,
        [prompt[20:36], prompt[30:31], prompt[31:32]],
        [0, 20, 25],
        tables,
        [2, 0, 1],
    )
    np.testing.assert_array_equal(got, np.stack(want))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tables": [table([0, 1, 10_000])]}, "entry 2 of sequence 0 is 10000, not a block id"),
        ({"tables": [table([0, -5, 2])]}, "entry 1 of sequence 0 is -5"),
        ({"tables": [table([0, 1])]}, "entry 2 of sequence 0 is -1"),
        ({"tables": [table([0, 1], width=2)]}, "no entry in its block table"),
        ({"ring_sets": [3]}, "ring set 3 of sequence 0 out of range"),
        ({"ring_sets": [-1]}, "ring set -1"),
        ({"positions": [8, 9, 11]}, "position 11 of sequence 0 does not continue"),
        ({"positions": [8, 9, 9]}, "position 9 of sequence 0 does not continue"),
        ({"positions": [-1, 0, 1]}, "position -1"),
        ({"positions": [2**31 - 3, 2**31 - 2, 2**31 - 1]}, "no entry in its block table"),
        (
            {"positions": [400, 401, 402], "tables": [table([0, 1, 2], width=200)]},
            "beyond what the pool's 96 blocks",
        ),
        ({"seqs": [0, 0, 1]}, "names sequence 1"),
        ({"tokens": [5, 6, 2**20]}, "out of range"),
        ({"output_rows": [3]}, "output row"),
    ],
)
def test_forward_rejects_bad_tables_before_writing(engine, layout, prompt, change, message):
    pool = layout.new_pool(engine.config)
    blocks = table([0, 1, 2])
    run(engine, pool, [prompt[:8]], [0], [blocks], [0], outputs=None)
    want = run(engine, pool, [prompt[8:9]], [8], [blocks], [0])
    call = {
        "tokens": [7, 7, 7],  # different from the prompt's: a write would change the logits
        "positions": [8, 9, 10],
        "seqs": [0, 0, 0],
        "tables": [blocks],
        "ring_sets": [0],
        "output_rows": [2],
    } | change
    with pytest.raises(ValueError, match=message):
        forward(
            engine,
            pool,
            call["tokens"],
            call["positions"],
            call["seqs"],
            call["tables"],
            call["ring_sets"],
            call["output_rows"],
        )
    np.testing.assert_array_equal(run(engine, pool, [prompt[8:9]], [8], [blocks], [0]), want)


def test_forward_rejects_a_chunk_its_ring_cannot_hold(engine, prompt):
    window = engine.config.sliding_window
    small = KvLayout.for_model(engine.config, 128, 1, 4, block_size=4)
    pool = small.new_pool(engine.config)
    assert small.ring_blocks == (window + 4 - 1 + 2) // 4 + 1
    blocks = [table(range(10))]
    run(engine, pool, [prompt[:21]], [0], blocks, [0], outputs=None)
    # Rows 21..28 attend back to position 6 (block 1); block 7 would take its place in the ring.
    with pytest.raises(ValueError, match="ring of 6 blocks cannot hold .* positions 21..28"):
        run(engine, pool, [prompt[21:29]], [21], blocks, [0])
    run(engine, pool, [prompt[21:28]], [21], blocks, [0])


def test_forward_rejects_malformed_calls(engine, fixtures_dir, layout):
    pool = layout.new_pool(engine.config)
    one = np.array([5], np.int32)
    rows = np.array([0], np.int32)
    with pytest.raises(ValueError, match="2-D"):
        forward(engine, pool, one, [0], [0], table([0]), [0], rows)
    with pytest.raises(ValueError, match="one ring set per table"):
        forward(engine, pool, one, [0], [0], [table([0])], [0, 1], rows)
    with pytest.raises(ValueError, match="same length"):
        forward(engine, pool, one, [0, 1], [0], [table([0])], [0], rows)
    with pytest.raises(ValueError, match="empty batch"):
        forward(engine, pool, [], [], [], [table([0])], [0], [])
    with pytest.raises(ValueError, match="exceeds n_batch"):
        n = N_BATCH + 1
        forward(engine, pool, [5] * n, np.arange(n), [0] * n, [table(range(13))], [0], rows)
    moe_config = open_model(fixtures_dir / MOE_MODEL).config
    moe_pool = KvLayout.for_model(moe_config, 16, 1, 4).new_pool(moe_config)
    with pytest.raises(ValueError, match="another model"):
        forward(engine, moe_pool, one, [0], [0], [table([0])], [0], rows)
