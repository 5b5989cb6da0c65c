"""Engine behaviour: sequences, batching, chunking and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pygemma4 import ContextFullError, Engine, Gemma4Error, NoFreeSequenceError, SamplingParams

MODEL = "gemma4-tiny-e/model-Q4_K_M.gguf"
MOE_MODEL = "gemma4-tiny-moe/model-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def prompts(fixtures_dir):
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    return [ref[f"ids{i}"] for i in range(3)]


@pytest.mark.parametrize("model", [MODEL, MOE_MODEL])
def test_chunked_prefill_equals_one_pass(fixtures_dir, prompts, model):
    whole = Engine(fixtures_dir / model, threads=2, n_batch=256)
    chunked = Engine(fixtures_dir / model, threads=2, n_batch=7)
    long_prompt = prompts[1]
    assert len(long_prompt) > 7 * 3
    np.testing.assert_array_equal(chunked.forward(long_prompt), whole.forward(long_prompt))


@pytest.mark.parametrize("model", [MODEL, MOE_MODEL])
def test_a_rows_logits_do_not_depend_on_the_rest_of_its_call(fixtures_dir, prompts, model):
    """The last prompt token gives the same bits run alone, in a decode step beside other
    sequences, or inside prompt chunks of any size: a server that batches differently from the
    engine still generates the same tokens."""
    engine = Engine(fixtures_dir / model, threads=2, max_sequences=3, n_batch=256)
    prompt = prompts[1]
    with engine.new_sequence() as seq:
        seq.append(prompt[:-1])
        alone = seq.append(prompt[-1:])
    seqs = [engine.new_sequence() for _ in prompts]
    for s, p in zip(seqs, prompts, strict=True):
        s.append(p[:-1])
    in_batch = engine.decode(seqs, [int(p[-1]) for p in prompts])[1]
    for s in seqs:
        s.close()
    np.testing.assert_array_equal(in_batch, alone)
    for n_batch in (5, 16, 256):
        chunked = Engine(fixtures_dir / model, threads=2, n_batch=n_batch)
        np.testing.assert_array_equal(chunked.forward(prompt)[-1], alone)


@pytest.mark.parametrize("model", [MODEL, MOE_MODEL])
def test_thread_count_does_not_change_the_numbers(fixtures_dir, prompts, model):
    one = Engine(fixtures_dir / model, threads=1).forward(prompts[1])
    three = Engine(fixtures_dir / model, threads=3).forward(prompts[1])
    np.testing.assert_array_equal(one, three)


@pytest.mark.parametrize("model", [MODEL, MOE_MODEL])
def test_batched_decode_equals_one_sequence_at_a_time(fixtures_dir, prompts, model):
    engine = Engine(fixtures_dir / model, threads=2, max_sequences=3)
    singles = [engine.generate(p, 12, stop_tokens=()) for p in prompts]
    seqs = [engine.new_sequence() for _ in prompts]
    tokens = [int(np.argmax(s.append(p))) for s, p in zip(seqs, prompts, strict=True)]
    batched = [[t] for t in tokens]
    for _ in range(11):
        logits = engine.decode(seqs, tokens)
        assert logits.shape == (3, engine.vocab_size)
        tokens = [int(t) for t in logits.argmax(-1)]
        for out, t in zip(batched, tokens, strict=True):
            out.append(t)
    for s in seqs:
        s.close()
    assert batched == singles


def test_generation_feeds_the_last_prompt_token_on_its_own(fixtures_dir, prompts, monkeypatch):
    """As a server does: the prompt but its last token in chunks without logits, then the last
    token alone, then one token per step."""
    engine = Engine(fixtures_dir / MODEL, threads=2, n_batch=16)
    calls = []
    forward = engine.runner.forward

    def record(feeds):
        calls.append(
            (sum(len(f.tokens) for f in feeds), sum(len(f.output_offsets()) for f in feeds))
        )
        return forward(feeds)

    monkeypatch.setattr(engine.runner, "forward", record)
    prompt = prompts[1][:40]
    engine.generate(prompt, 3, stop_tokens=())
    assert calls == [(16, 0), (16, 0), (7, 0), (1, 1), (1, 1), (1, 1)]


def test_sequences_keep_their_own_positions(fixtures_dir, prompts):
    engine = Engine(fixtures_dir / MODEL, threads=2, max_sequences=2)
    expected = engine.forward(prompts[0])[-1]
    with engine.new_sequence() as a, engine.new_sequence() as b:
        b.append(prompts[1])
        a.append(prompts[0][:5])
        b.append([5, 6, 7])
        got = a.append(prompts[0][5:])
        assert a.length == len(prompts[0])
        assert b.length == len(prompts[1]) + 3
    np.testing.assert_array_equal(got, expected)


def test_generate_returns_exactly_max_tokens_unless_stopped(fixtures_dir, prompts):
    engine = Engine(fixtures_dir / MODEL, threads=2)
    out = engine.generate(prompts[0], 10, stop_tokens=())
    assert len(out) == 10
    stopped = engine.generate(prompts[0], 10, stop_tokens=[out[3]])
    assert stopped == out[: out.index(out[3]) + 1]


def test_bad_tokens_are_rejected(fixtures_dir):
    engine = Engine(fixtures_dir / MODEL, threads=1)
    with pytest.raises(ValueError, match="out of range"):
        engine.forward([2, engine.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        engine.forward([-1])
    with pytest.raises(ValueError, match="out of range"):
        engine.forward([2, 2**40])
    with pytest.raises(ValueError, match="non-empty"):
        engine.forward([])
    with pytest.raises(TypeError, match="integers"):
        engine.forward([2.5])


def test_sequence_longer_than_context_is_rejected(fixtures_dir):
    engine = Engine(fixtures_dir / MODEL, threads=1, n_ctx=8)
    with pytest.raises(ContextFullError, match="context"):
        engine.forward(list(range(2, 11)))
    with pytest.raises(ContextFullError, match="context"):
        engine.generate([2, 3, 4, 5], 6)
    assert len(engine.generate([2, 3, 4, 5], 5, stop_tokens=())) == 5
    with engine.new_sequence() as seq:
        seq.append(list(range(2, 10)))
        with pytest.raises(ContextFullError):
            engine.decode([seq], [3])


def test_sequence_slots_are_limited_and_reused(fixtures_dir):
    engine = Engine(fixtures_dir / MODEL, threads=1, max_sequences=1)
    seq = engine.new_sequence()
    with pytest.raises(NoFreeSequenceError):
        engine.new_sequence()
    seq.close()
    with pytest.raises(Gemma4Error, match="closed"):
        seq.append([2])
    with engine.new_sequence() as again:
        assert again.length == 0


def test_engine_kv_layout(fixtures_dir):
    engine = Engine(fixtures_dir / MODEL, threads=1, n_ctx=100, max_sequences=2, n_batch=8)
    layout = engine.kv_layout
    # A ring set per sequence, and one more per sequence for prefix snapshots.
    assert engine.max_sequences == 2 and layout.n_ring_sets == 4
    assert layout.n_blocks == 2 * layout.blocks_for(100)
    assert engine.kv_cache_bytes == layout.nbytes
    with engine.new_sequence() as a, engine.new_sequence() as b:
        a.append(list(range(2, 40)))
        b.append(list(range(2, 5)))
        assert a.kv.block_table == list(range(layout.blocks_for(38)))
        assert len(b.kv.block_table) == 1 and a.kv.ring_set != b.kv.ring_set
    with engine.new_sequence() as c:  # a and b gave everything back
        c.append(list(range(2, 102)))
        assert len(c.kv.block_table) == layout.blocks_for(100)


def test_a_sequence_of_another_engine_is_rejected(fixtures_dir):
    one = Engine(fixtures_dir / MODEL, threads=1)
    other = Engine(fixtures_dir / MODEL, threads=1)
    with one.new_sequence() as seq, pytest.raises(ValueError, match="another engine"):
        other.decode([seq], [2])


def test_bad_engine_arguments(fixtures_dir, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        Engine(fixtures_dir / MODEL, backend="tpu")
    with pytest.raises(ValueError, match="threads"):
        Engine(fixtures_dir / MODEL, threads=0)
    with pytest.raises(ValueError, match="n_ctx"):
        Engine(fixtures_dir / MODEL, n_ctx=-4)
    with pytest.raises(Gemma4Error):
        Engine(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"this is not a model file at all")
    with pytest.raises(Gemma4Error):
        Engine(not_gguf)


def test_unknown_cpu_kernel_set_is_rejected(fixtures_dir, monkeypatch):
    monkeypatch.setenv("PYGEMMA4_CPU_KERNELS", "sse9")
    with pytest.raises(ValueError, match="PYGEMMA4_CPU_KERNELS: unknown CPU kernel set 'sse9'"):
        Engine(fixtures_dir / MODEL)


@pytest.fixture(scope="module")
def demo_engine(demo_model_file):
    """The demo model: random weights that, unlike the fixtures', give varied continuations."""
    return Engine(demo_model_file, threads=2)


def test_generate_stops_at_end_of_generation_tokens_by_default(demo_engine):
    prompt = demo_engine.tokenizer.encode("Hello there")
    free = demo_engine.generate(prompt, 16, stop_tokens=())
    ends = demo_engine.tokenizer.end_of_generation_ids
    assert not ends & set(free)  # this greedy run never ends a turn by itself
    assert demo_engine.generate(prompt, 16) == free
    stop = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    stopped = demo_engine.generate(prompt, 16, stop_tokens=ends | {stop})
    assert stopped == free[: free.index(stop) + 1]


def test_stream_text_and_stop_strings(demo_engine):
    tokenizer = demo_engine.tokenizer
    prompt = tokenizer.encode("Hello there")
    chunks = list(demo_engine.stream(prompt, 24, stop_tokens=()))
    ids = [c.token_id for c in chunks]
    text = "".join(c.text for c in chunks)
    assert text == tokenizer.decode(ids, skip_special=True)
    assert len(text) > 10
    assert chunks[-1].finish_reason == "length"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(temperature=0, stop=[stop])
    cut = list(demo_engine.stream(prompt, 24, params, stop_tokens=()))
    assert "".join(c.text for c in cut) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    assert [c.token_id for c in cut] == ids[: len(cut)]


def test_seeded_sampling_repeats_and_differs_by_seed(demo_engine):
    prompt = demo_engine.tokenizer.encode("Hello there")

    def run(seed):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return demo_engine.generate(prompt, 16, params, stop_tokens=())

    assert run(5) == run(5)
    assert run(5) != run(6)
    greedy = demo_engine.generate(prompt, 16, SamplingParams(temperature=0), stop_tokens=())
    assert greedy == demo_engine.generate(prompt, 16, stop_tokens=())


def test_stream_validates_before_running(fixtures_dir):
    engine = Engine(fixtures_dir / MODEL, threads=1, n_ctx=8)
    with pytest.raises(ContextFullError):
        engine.stream([2, 3, 4, 5], 6)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.stream([2, 3], 0)
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.stream([2, 3], 2, sampling={"temperature": 0.5})
    with engine.new_sequence():  # the stream above never took a slot
        pass
