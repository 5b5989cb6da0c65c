"""KV bookkeeping in Python: pool layouts, the block allocator and per-sequence block tables."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pygemma4 import _core, open_model
from pygemma4.config import ModelConfig
from pygemma4.errors import Gemma4Error
from pygemma4.kv import BlockAllocator, KvExhaustedError, KvLayout, SequenceKv

MODEL = "gemma4-tiny-e/model-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def config(fixtures_dir) -> ModelConfig:
    return open_model(fixtures_dir / MODEL).config


def ring_blocks_needed(window: int, n_ctx: int, max_chunk: int, block_size: int) -> int:
    """The ring rule checked by brute force: for every chunk of at most max_chunk positions
    [a, b] within n_ctx, the blocks from the first key its first row attends to through b."""
    return max(
        b // block_size - max(0, a - window + 1) // block_size + 1
        for a in range(n_ctx)
        for b in range(a, min(n_ctx, a + max_chunk))
    )


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("window", [1, 5, 16, 40])
@pytest.mark.parametrize(("n_ctx", "max_chunk"), [(1, 1), (30, 1), (30, 7), (64, 16), (64, 200)])
def test_ring_blocks_are_the_fewest_the_ring_rule_allows(
    config, block_size, window, n_ctx, max_chunk
):
    layout = KvLayout.for_model(
        dataclasses.replace(config, sliding_window=window), n_ctx, 2, max_chunk, block_size
    )
    assert layout.ring_blocks == ring_blocks_needed(window, n_ctx, max_chunk, block_size)


def test_layout_for_model(config):
    layout = KvLayout.for_model(config, n_ctx=100, max_sequences=3, max_chunk=8)
    assert (layout.block_size, layout.n_blocks, layout.n_ring_sets) == (16, 3 * 7, 3)
    assert layout.nbytes == _core.KvPool.bytes_needed(config, 16, 21, 3, layout.ring_blocks)
    assert KvLayout.of(config, 16, 21, 3, layout.ring_blocks) == layout
    assert layout.nbytes == layout.new_pool(config).nbytes
    assert layout.blocks_for(0) == 0
    assert layout.blocks_for(16) == 1
    assert layout.blocks_for(17) == 2
    smaller = KvLayout.for_model(config, 100, 3, 8, block_size=4, n_blocks=5)
    assert (smaller.block_size, smaller.n_blocks) == (4, 5)
    assert smaller.nbytes < layout.nbytes


def test_layout_without_sliding_layers_has_one_block_rings(config):
    full = dataclasses.replace(
        config,
        layers=tuple(dataclasses.replace(layer, is_sliding=False) for layer in config.layers),
    )
    assert KvLayout.for_model(full, 4096, 1, 256).ring_blocks == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_ctx": 0},
        {"max_sequences": -1},
        {"max_chunk": 0},
        {"block_size": 0},
        {"n_blocks": 0},
        {"n_ctx": 2.5},
    ],
)
def test_bad_layout_arguments(config, kwargs):
    args = {"n_ctx": 64, "max_sequences": 1, "max_chunk": 8} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        KvLayout.for_model(config, **args)


@pytest.fixture
def allocator(config) -> BlockAllocator:
    return BlockAllocator(KvLayout.for_model(config, 64, 2, 8, block_size=16, n_blocks=6))


def test_allocator_hands_out_and_takes_back(allocator):
    assert allocator.free_blocks == 6
    first = allocator.allocate(2)
    second = allocator.allocate(3)
    assert first == [0, 1] and second == [2, 3, 4]
    assert allocator.free_blocks == 1
    assert allocator.can_allocate(1) and not allocator.can_allocate(2)
    with pytest.raises(KvExhaustedError, match="2 KV blocks wanted, 1 of 6 free"):
        allocator.allocate(2)
    allocator.free(first)
    assert allocator.free_blocks == 3
    assert sorted(allocator.allocate(3)) == [0, 1, 5]
    assert allocator.allocate(0) == []


def test_allocator_rejects_double_and_foreign_frees(allocator):
    blocks = allocator.allocate(2)
    allocator.free(blocks[:1])
    with pytest.raises(ValueError, match="freed twice"):
        allocator.free(blocks[:1])
    with pytest.raises(ValueError, match="freed twice"):
        allocator.free([blocks[1], blocks[1]])
    for foreign in (6, -1, 1.0, "1"):
        with pytest.raises(ValueError, match="not a KV block id"):
            allocator.free([blocks[1], foreign])
    assert allocator.free_blocks == 5  # the failed frees freed nothing
    allocator.free(blocks[1:])
    assert allocator.free_blocks == 6


def test_allocator_ring_sets(allocator):
    assert allocator.free_ring_sets == 2
    a, b = allocator.allocate_ring_set(), allocator.allocate_ring_set()
    assert (a, b) == (0, 1)
    with pytest.raises(KvExhaustedError, match="ring set"):
        allocator.allocate_ring_set()
    allocator.free_ring_set(a)
    with pytest.raises(ValueError, match="freed twice"):
        allocator.free_ring_set(a)
    with pytest.raises(ValueError, match="not a ring set id"):
        allocator.free_ring_set(2)
    assert allocator.allocate_ring_set() == a


def test_sequence_kv_grows_and_releases(allocator):
    seq = SequenceKv(allocator)
    assert seq.ring_set == 0 and seq.block_table == []
    seq.ensure(1)
    assert seq.block_table == [0]
    seq.ensure(16)
    assert seq.block_table == [0]
    other = SequenceKv(allocator)
    other.ensure(20)
    seq.ensure(33)
    assert seq.block_table == [0, 3, 4]
    np.testing.assert_array_equal(seq.table_array(5), [0, 3, 4, -1, -1])
    assert seq.table_array(3).dtype == np.int32
    with pytest.raises(ValueError, match="width 2"):
        seq.table_array(2)
    with pytest.raises(KvExhaustedError):
        seq.ensure(16 * 5)  # two more wanted, one free
    assert seq.block_table == [0, 3, 4] and allocator.free_blocks == 1
    seq.release()
    seq.release()
    assert allocator.free_blocks == 4 and allocator.free_ring_sets == 1
    with pytest.raises(Gemma4Error, match="released"):
        seq.ensure(1)
    other.release()
    assert allocator.free_blocks == 6 and allocator.free_ring_sets == 2


def test_layout_past_what_the_core_addresses(config: ModelConfig) -> None:
    with pytest.raises(KvExhaustedError, match="more than the core addresses"):
        KvLayout.for_model(config, 2**40, 1, 16)
