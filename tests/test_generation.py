"""Generation without a model: logits that put all weight on a chosen token drive the real
sampler, detokenizer and stop-string logic through scripted continuations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pygemma4.generation import Generation, StopStrings
from pygemma4.sampling import SamplingParams
from pygemma4.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(demo_model_file: Path) -> Tokenizer:
    return Tokenizer.from_gguf(demo_model_file)


def one_hot(tokenizer: Tokenizer, token_id: int) -> np.ndarray:
    logits = np.full(tokenizer.vocab_size, -30.0, dtype=np.float32)
    logits[token_id] = 30.0
    return logits


def run(generation: Generation, tokenizer: Tokenizer, script: list[int]) -> list:
    chunks = []
    for token in script:
        chunks.append(generation.step(one_hot(tokenizer, token)))
        if generation.finished:
            break
    return chunks


def byte_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return [tokenizer.tokens.index(f"<0x{b:02X}>") for b in text.encode()]


def test_text_streams_and_length_finishes(tokenizer: Tokenizer) -> None:
    script = tokenizer.encode("Hello world, again", add_bos=False)
    chunks = run(Generation([2], len(script), tokenizer=tokenizer), tokenizer, script)
    assert "".join(c.text for c in chunks) == "Hello world, again"
    assert [c.token_id for c in chunks] == script
    assert [c.finish_reason for c in chunks] == [None] * (len(script) - 1) + ["length"]


def test_end_of_generation_token_stops_without_text(tokenizer: Tokenizer) -> None:
    turn_end = tokenizer.tokens.index("<turn|>")
    script = [*tokenizer.encode("Hi", add_bos=False), turn_end, *tokenizer.encode("x")]
    generation = Generation([2], 50, tokenizer=tokenizer)
    chunks = run(generation, tokenizer, script)
    assert chunks[-1].token_id == turn_end
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == "Hi"
    assert generation.token_ids == script[: script.index(turn_end) + 1]


def test_stop_tokens_can_be_turned_off(tokenizer: Tokenizer) -> None:
    script = [tokenizer.eos_id, *tokenizer.encode("ok", add_bos=False)]
    chunks = run(
        Generation([2], len(script), tokenizer=tokenizer, stop_tokens=()), tokenizer, script
    )
    assert [c.token_id for c in chunks] == script
    assert "".join(c.text for c in chunks) == "ok"  # control tokens are not shown


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("Hello world, again", ["world"], "Hello "),
        ("Hello world, again", ["o w", "again"], "Hell"),
        ("Hello world, again", ["again", "lo"], "Hel"),
        ("Hello world, again", ["xyz"], "Hello world, again"),
        ("Hello world, again", ["n"], "Hello world, agai"),
        ("aaaa", ["aab"], "aaaa"),
    ],
)
def test_stop_strings_cut_exactly(
    tokenizer: Tokenizer, text: str, stops: list[str], expected: str
) -> None:
    # One token per character, so every stop string is split across tokens.
    script = [i for ch in text for i in tokenizer.encode(ch, add_bos=False)]
    params = SamplingParams(temperature=0, stop=stops)
    chunks = run(Generation([2], len(script), params, tokenizer), tokenizer, script)
    assert "".join(c.text for c in chunks) == expected
    stopped = expected != text
    assert chunks[-1].finish_reason == ("stop" if stopped else "length")
    if stopped:
        assert len(chunks) == len(expected) + min(len(s) for s in stops if s in text)


def test_stop_string_inside_a_character_split_across_tokens(tokenizer: Tokenizer) -> None:
    script = byte_ids(tokenizer, "a東b")
    params = SamplingParams(temperature=0, stop=["東"])
    chunks = run(Generation([2], 100, params, tokenizer), tokenizer, script)
    assert "".join(c.text for c in chunks) == "a"
    assert [c.text for c in chunks] == ["a", "", "", ""]
    assert chunks[-1].finish_reason == "stop"


def test_held_back_text_is_released_at_the_end(tokenizer: Tokenizer) -> None:
    script = tokenizer.encode("say wor", add_bos=False)
    params = SamplingParams(temperature=0, stop=["world"])
    chunks = run(Generation([2], len(script), params, tokenizer), tokenizer, script)
    assert "".join(c.text for c in chunks) == "say wor"
    assert chunks[-1].finish_reason == "length"


def test_incomplete_character_at_the_end_becomes_replacement(tokenizer: Tokenizer) -> None:
    script = byte_ids(tokenizer, "東")[:2]
    chunks = run(Generation([2], 2, tokenizer=tokenizer), tokenizer, script)
    assert [c.text for c in chunks] == ["", "\ufffd"]


def test_stop_string_matcher_directly() -> None:
    stops = StopStrings(["</end>", "STOP"])
    assert stops.push("text </e") == ("text ", False)
    assert stops.push("nx S") == ("</enx ", False)
    assert stops.push("TO") == ("", False)
    assert stops.push("P tail") == ("", True)
    assert StopStrings([]).push("anything") == ("anything", False)


def test_seeded_generation_repeats(tokenizer: Tokenizer) -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(40, tokenizer.vocab_size)).astype(np.float32)

    def tokens(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        generation = Generation([2], 40, params, tokenizer, stop_tokens=())
        return [generation.step(row).token_id for row in rows]

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_logprobs_travel_with_the_chunk(tokenizer: Tokenizer) -> None:
    params = SamplingParams(temperature=0, logprobs=3)
    chunk = Generation([2], 5, params, tokenizer).step(one_hot(tokenizer, 300))
    assert chunk.sampled.top_logprobs[0][0] == 300
    assert len(chunk.sampled.top_logprobs) == 3
    assert chunk.sampled.logprob == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_tokens": 0}, ValueError, "max_tokens must be a positive integer"),
        ({"max_tokens": True}, ValueError, "max_tokens must be a positive integer"),
        ({"sampling": {"temperature": 1}}, TypeError, "sampling must be SamplingParams"),
        (
            {"sampling": SamplingParams(stop=["x"]), "tokenizer": None},
            ValueError,
            "stop strings need the model's tokenizer",
        ),
    ],
)
def test_bad_arguments(tokenizer: Tokenizer, kwargs: dict, error: type, match: str) -> None:
    arguments = {"max_tokens": 4, "sampling": None, "tokenizer": tokenizer, **kwargs}
    with pytest.raises(error, match=match):
        Generation([2], **arguments)


def test_step_after_finish_is_an_error(tokenizer: Tokenizer) -> None:
    generation = Generation([2], 1, tokenizer=tokenizer)
    generation.step(one_hot(tokenizer, 300))
    with pytest.raises(RuntimeError, match="already finished"):
        generation.step(one_hot(tokenizer, 300))
