"""The model runner: forward batches over many sequences, outputs as logits or device-chosen
tokens, prefill packing, verifying several tokens at once, and rolling a sequence back."""

from __future__ import annotations

import numpy as np
import pytest

from pygemma4 import Engine, RollbackError, open_model
from pygemma4.kv import BlockAllocator, KvLayout, SequenceKv
from pygemma4.runner import Feed, ModelRunner, SpanSplitError

MODELS = ["gemma4-tiny-e/model-Q4_K_M.gguf", "gemma4-tiny-moe/model-Q8_0.gguf"]
N_BATCH = 8


@pytest.fixture(scope="module")
def prompt(fixtures_dir) -> np.ndarray:
    """A prompt longer than the sliding window (16) and the ring of an N_BATCH engine."""
    return np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")["ids1"].astype(np.int32)


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: m.split("/")[0])
def engine(request, fixtures_dir) -> Engine:
    return Engine(
        fixtures_dir / request.param, threads=2, n_ctx=96, max_sequences=2, n_batch=N_BATCH
    )


def other_tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 500, n).astype(np.int32)


def test_the_window_and_ring_are_what_the_rollback_tests_cross(engine, prompt):
    assert engine.config.sliding_window == 16
    assert engine.kv_layout.block_size == 16 and engine.kv_layout.ring_blocks == 3
    assert len(prompt) >= 40


@pytest.mark.parametrize(
    ("kept", "appended"),
    [
        (10, 5),  # within the first block and the window
        (12, 10),  # from before the window's edge to past it
        (20, 9),  # past the edge: the rings have wrapped
        (30, 18),  # the written blocks reach the ring's size exactly
        (0, 7),  # back to nothing
    ],
)
def test_append_rollback_append_equals_a_fresh_run(engine, prompt, kept, appended):
    replacement = other_tokens(6, kept)
    fresh = engine.forward(np.concatenate([prompt[:kept], replacement]))[kept:]
    with engine.new_sequence() as seq:
        if kept:
            seq.append(prompt[:kept])
        for first in range(kept, kept + appended, 4):  # several calls, as decode steps would
            seq.append(prompt[first : min(first + 4, kept + appended)])
        seq.rollback(kept)
        assert seq.length == kept
        again = seq.append(replacement, all_logits=True)
    np.testing.assert_array_equal(again, fresh)


def test_rollback_is_refused_once_the_ring_has_lost_the_window(engine, prompt):
    with engine.new_sequence() as seq:
        seq.append(prompt[:10])
        seq.append(prompt[10:40])  # block 2: the ring of 3 blocks still holds block 0
        seq.rollback(12)
        seq.append(prompt[12:40])
        seq.append(prompt[40:50])  # block 3 took the place of block 0
        with pytest.raises(RollbackError, match="ring of 3 blocks .* positions up to 49"):
            seq.rollback(10)
        assert seq.length == 50
        seq.rollback(35)  # needs positions 20..34: blocks 1 and 2, still in the ring
        expected = engine.forward(prompt[:40])[35:]
        np.testing.assert_array_equal(seq.append(prompt[35:40], all_logits=True), expected)
        with pytest.raises(
            RollbackError, match="cannot roll a sequence of 40 positions back to 41"
        ):
            seq.rollback(41)
        with pytest.raises(RollbackError):
            seq.rollback(-1)


def test_verifying_several_tokens_equals_one_step_each(engine, prompt):
    runner = engine.runner
    with engine.new_sequence() as a, engine.new_sequence() as b:
        a.append(prompt[:20])
        b.append(prompt[5:9])
        one_by_one = [b.append(prompt[9 + i : 10 + i]) for i in range(3)]
        b.rollback(4)
        results = runner.decode(
            [Feed(a.kv, prompt[20:21]), Feed(b.kv, prompt[9:12], outputs="all")]
        )
        assert (a.length, b.length) == (21, 7)
    expected_a = engine.forward(prompt[:21])[-1]
    np.testing.assert_array_equal(results[0].logits, expected_a[None])
    np.testing.assert_array_equal(results[1].logits, np.stack(one_by_one))


@pytest.fixture(scope="module")
def device_chooser(fixtures_dir) -> tuple[ModelRunner, BlockAllocator]:
    """A CPU runner told to choose greedy tokens where the model computes, as CUDA does, and
    an allocator of its pool."""
    model_file = open_model(fixtures_dir / MODELS[0])
    layout = KvLayout.for_model(model_file.config, 64, 3, N_BATCH)
    pool = layout.new_pool(model_file.config)
    runner = ModelRunner(model_file, pool, N_BATCH, 2, chooses_on_device=True)
    return runner, BlockAllocator(layout)


def test_a_step_brings_back_logits_only_for_the_rows_that_need_them(device_chooser, prompt):
    runner, allocator = device_chooser
    seqs = [SequenceKv(allocator) for _ in range(3)]
    try:
        for i, kv in enumerate(seqs):
            runner.prefill(Feed(kv, prompt[i : i + 6], "none"))
        feeds = [
            Feed(seqs[0], prompt[6:7], greedy=True),
            Feed(seqs[1], prompt[7:8]),
            Feed(seqs[2], prompt[8:11], outputs="all", greedy=True),
        ]
        greedy_a, sampled, greedy_c = runner.decode(feeds)
        for kv, n in zip(seqs, (1, 1, 3), strict=True):
            runner.rollback(kv, kv.length - n)
        logits = runner.decode([Feed(f.kv, f.tokens, f.outputs) for f in feeds])
    finally:
        for kv in seqs:
            kv.release()
    assert greedy_a.logits is None and sampled.tokens is None and greedy_c.logits is None
    np.testing.assert_array_equal(sampled.logits, logits[1].logits)
    for chosen, full in ((greedy_a, logits[0]), (greedy_c, logits[2])):
        np.testing.assert_array_equal(chosen.tokens, full.logits.argmax(-1))
        log_softmax = (
            full.logits - np.logaddexp.reduce(full.logits.astype(np.float64), axis=-1)[:, None]
        )
        expected = log_softmax[np.arange(len(chosen.tokens)), chosen.tokens]
        np.testing.assert_allclose(chosen.logprobs, expected, atol=1e-4)


def test_prefill_packs_prompts_oldest_first_into_calls_of_n_batch_or_budget(device_chooser, prompt):
    runner, allocator = device_chooser
    pending = [(SequenceKv(allocator), prompt[:n]) for n in (3, 9, 2)]
    try:
        feeds = runner.next_prefill(pending)
        assert [len(f.tokens) for f in feeds] == [3, 5]
        assert all(f.outputs == "none" for f in feeds)
        runner.forward(feeds)
        assert [kv.length for kv, _ in pending] == [3, 5, 0]
        rest = [(kv, tokens[kv.length :]) for kv, tokens in pending[1:]]
        assert [len(f.tokens) for f in runner.next_prefill(rest)] == [4, 2]
        assert [len(f.tokens) for f in runner.next_prefill(rest, budget=3)] == [3]
        assert [len(f.tokens) for f in runner.next_prefill(rest, budget=5)] == [4, 1]
    finally:
        for kv, _ in pending:
            kv.release()


def test_prefill_never_cuts_a_span(device_chooser, prompt):
    """Spans (an image's soft tokens, attended both ways) stay whole: a prompt whose next span
    does not fit what a call has left waits for the next call; one longer than a whole call
    is refused."""
    runner, allocator = device_chooser
    pending = [(SequenceKv(allocator), prompt[:n]) for n in (3, 9)]
    spans = [np.empty((0, 2), np.int32), np.array([[2, 7]], np.int32)]
    try:
        # 8 rows: 3 of the first prompt, then 5 left; the second's span ends at row 7.
        assert [len(f.tokens) for f in runner.next_prefill(pending, spans=spans)] == [3, 2]
        assert [len(f.tokens) for f in runner.next_prefill(pending, 5, spans)] == [3, 2]
        assert [len(f.tokens) for f in runner.next_prefill(pending, 4, spans)] == [3, 1]
        assert [len(f.tokens) for f in runner.next_prefill(pending[1:], 6, spans[1:])] == [2]
        first = [spans[0], np.array([[0, 5]], np.int32)]
        assert [len(f.tokens) for f in runner.next_prefill(pending, 7, first)] == [3]
        assert [len(f.tokens) for f in runner.next_prefill(pending[1:], 6, first[1:])] == [6]
        with pytest.raises(SpanSplitError, match="longer than a prefill call of 4 tokens"):
            runner.next_prefill(pending[1:], 4, first[1:])
    finally:
        for kv, _ in pending:
            kv.release()


def test_a_refused_call_writes_nothing_and_grows_no_sequence(engine, prompt):
    with engine.new_sequence() as seq:
        seq.append(prompt[:4])
        with pytest.raises(ValueError, match="exceeds n_batch"):
            engine.runner.decode([Feed(seq.kv, prompt[4 : 5 + N_BATCH])])
        with pytest.raises(ValueError, match="appears twice"):
            engine.runner.forward([Feed(seq.kv, prompt[4:5]), Feed(seq.kv, prompt[5:6])])
        assert seq.length == 4
        np.testing.assert_array_equal(seq.append(prompt[4:6]), engine.forward(prompt[:6])[-1])
