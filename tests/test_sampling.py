"""Token sampling: parameter checks, greedy choice, seeded draws against softmax, truncation
(top-k, top-p, min-p), penalties and log-probabilities, each against float64 references
computed here."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from pygemma4.errors import Gemma4Error, SamplingParamsError
from pygemma4.sampling import (
    GREEDY,
    SampledToken,
    Sampler,
    SamplingParams,
    apply_penalties,
)

# --- references -------------------------------------------------------------------------


def softmax64(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of logits / temperature in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    finite = scaled[np.isfinite(scaled)]
    e = np.exp(scaled - finite.max())
    return e / e.sum()


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """Log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max()
    return x - (top + math.log(np.exp(x - top).sum()))


def reference_distribution(
    logits: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids ascending, probabilities) after temperature, top-k, top-p and min-p, computed
    with a full sort in float64, ties ordered lower id first."""
    x = np.asarray(logits, dtype=np.float64)
    ids = np.arange(x.shape[0])
    order = np.lexsort((ids, -x))  # most likely first, lower id first among equals
    p = softmax64(x, temperature)
    kept = order if top_k == 0 else order[:top_k]
    if top_p < 1.0:
        cumulative = np.cumsum(p[kept] / p[kept].sum())
        kept = kept[: min(int(np.searchsorted(cumulative, top_p)) + 1, len(kept))]
    if min_p > 0.0:
        kept = kept[p[kept] >= min_p * p.max()]
    kept = np.sort(kept[p[kept] > 0])
    return kept, p[kept] / p[kept].sum()


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson's statistic of observed `counts` against `probabilities`."""
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


def draw_counts(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    """How often each token was drawn in `n` samples from one sampler."""
    sampler = Sampler(params, vocab_size=logits.shape[0])
    counts = np.zeros(logits.shape[0], dtype=np.int64)
    for _ in range(n):
        counts[sampler.sample(logits).token_id] += 1
    return counts


# With at most 6 degrees of freedom a statistic above 35 has probability under 1e-5; the draws
# are seeded, so the outcome is fixed anyway: the bound only has to be one a correct sampler
# meets.
CHI2_BOUND = 35.0

FIVE = np.array([1.0, 0.5, -0.3, 2.0, 0.0], dtype=np.float32)


def random_logits(n: int, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


# --- parameters -------------------------------------------------------------------------

BAD_VALUES = [
    ("temperature", -1.0),
    ("temperature", -1e-9),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1.0"),
    ("temperature", True),
    ("temperature", None),
    ("top_k", -1),
    ("top_k", 2.0),
    ("top_k", 1.5),
    ("top_k", True),
    ("top_k", "40"),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("top_p", False),
    ("min_p", -0.1),
    ("min_p", 1.01),
    ("min_p", math.inf),
    ("min_p", "0.1"),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", True),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", math.nan),
    ("presence_penalty", "1"),
    ("frequency_penalty", 3),
    ("frequency_penalty", -math.inf),
    ("frequency_penalty", False),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", 1.0),
    ("seed", True),
    ("seed", "7"),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 1.0),
    ("logprobs", True),
    ("logprobs", None),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_is_rejected_naming_parameter_and_value(name: str, value: object) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{name: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{name} must be "), message
    assert message.endswith(f", got {value!r}"), message


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0, got -1.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"min_p": 2}, "min_p must be in [0, 1], got 2"),
        ({"top_k": -3}, "top_k must be an integer in [0, 2**31) (0 disables it), got -3"),
        ({"presence_penalty": 3.0}, "presence_penalty must be in [-2, 2], got 3.0"),
        ({"logprobs": 21}, "logprobs must be an integer in [0, 20], got 21"),
        ({"seed": -1}, "seed must be None or an integer in [0, 2**64), got -1"),
    ],
)
def test_messages_give_the_allowed_range(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SamplingParamsError, match="^" + re.escape(message) + "$"):
        SamplingParams(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "stop",
    [
        "",
        [""],
        ["ok", ""],
        ["ok", 3],
        ["x" * 257],
        ["s"] * 17,
        5,
        None,
        b"end",
        {"a": 1},
    ],
)
def test_bad_stop_is_rejected(stop: object) -> None:
    with pytest.raises(SamplingParamsError, match=r"^stop(\[\d+\])? must be "):
        SamplingParams(stop=stop)  # type: ignore[arg-type]


def test_sampling_params_error_is_a_value_error_and_a_gemma4_error() -> None:
    with pytest.raises(ValueError):
        SamplingParams(top_p=2.0)
    with pytest.raises(Gemma4Error):
        SamplingParams(top_p=2.0)


def test_values_at_the_edges_are_accepted_and_normalised() -> None:
    params = SamplingParams(
        temperature=0,
        top_k=np.int64(5),  # type: ignore[arg-type]
        top_p=1,
        min_p=1,
        repetition_penalty=np.float32(1.5),  # type: ignore[arg-type]
        presence_penalty=-2,
        frequency_penalty=2,
        seed=2**64 - 1,
        stop=["a", "b" * 256],
        logprobs=20,
    )
    assert type(params.temperature) is float and params.temperature == 0.0
    assert type(params.top_k) is int and params.top_k == 5
    assert type(params.top_p) is float and type(params.min_p) is float
    assert type(params.repetition_penalty) is float and params.repetition_penalty == 1.5
    assert params.presence_penalty == -2.0 and params.frequency_penalty == 2.0
    assert params.stop == ("a", "b" * 256)
    assert SamplingParams(seed=0, stop=["s"] * 16, min_p=0).seed == 0


def test_stop_accepts_a_string_a_list_or_any_iterable() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=(s for s in ["x", "y"])).stop == ("x", "y")  # type: ignore[arg-type]
    assert SamplingParams().stop == ()


def test_params_are_frozen_and_replace_revalidates() -> None:
    params = SamplingParams(top_k=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.top_k = 4  # type: ignore[misc]
    with pytest.raises(SamplingParamsError, match="^top_k"):
        dataclasses.replace(params, top_k=-1)
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))


def test_greedy_property_and_constant() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy
    assert not SamplingParams(temperature=0.01, top_k=2).greedy
    assert GREEDY.greedy
    assert SamplingParams(temperature=0.0) == GREEDY


def test_from_mapping_builds_params_and_rejects_unknown_names() -> None:
    params = SamplingParams.from_mapping({"temperature": 0.7, "top_k": 40, "stop": ["\n"]})
    assert params == SamplingParams(temperature=0.7, top_k=40, stop=("\n",))
    assert SamplingParams.from_mapping({}) == SamplingParams()
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_mapping({"temprature": 0.7, "top_k": 4, "beam": 2})
    message = str(info.value)
    assert "'temprature'" in message and "'beam'" in message and "'top_k'" not in message
    assert "temperature" in message  # the known names are listed
    with pytest.raises(SamplingParamsError, match="^top_p must be in"):
        SamplingParams.from_mapping({"top_p": 0})
    with pytest.raises(SamplingParamsError, match="mapping"):
        SamplingParams.from_mapping([("top_k", 3)])  # type: ignore[arg-type]


def test_to_dict_is_json_and_round_trips() -> None:
    params = SamplingParams(
        temperature=0.5, top_k=7, top_p=0.9, min_p=0.1, seed=3, stop=["a"], logprobs=2
    )
    values = params.to_dict()
    assert values["stop"] == ["a"] and values["top_k"] == 7
    assert SamplingParams.from_mapping(json.loads(json.dumps(values))) == params


# --- sampler arguments ------------------------------------------------------------------


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="SamplingParams"):
        Sampler({"temperature": 0.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(GREEDY, vocab_size=0)
    with pytest.raises(ValueError, match="prompt_ids.*7"):
        Sampler(GREEDY, prompt_ids=[1, 7], vocab_size=5)
    with pytest.raises(ValueError, match="prompt_ids.*-1"):
        Sampler(GREEDY, prompt_ids=[1, -1])
    with pytest.raises(ValueError, match="prompt_ids"):
        Sampler(GREEDY, prompt_ids=[1.5, 2.0])  # type: ignore[list-item]
    sampler = Sampler(GREEDY, vocab_size=5)
    with pytest.raises(ValueError, match="token_id"):
        sampler.accept(5)
    with pytest.raises(ValueError, match="token_id"):
        sampler.accept(-1)
    with pytest.raises(TypeError, match="token_id"):
        sampler.accept(True)


@pytest.mark.parametrize(
    ("logits", "vocab_size", "pattern"),
    [
        (np.zeros((2, 5), np.float32), None, r"1-D.*\(2, 5\)"),
        (np.zeros(6, np.float32), 5, r"\(6,\).*\(5,\)"),
        (np.zeros(0, np.float32), None, "empty"),
        (np.array([0.0, np.nan, 1.0], np.float32), None, "NaN.*index 1"),
        (np.array([0.0, np.inf], np.float32), None, r"\+inf.*index 1"),
        (np.full(3, -np.inf, np.float32), None, "all -inf"),
        (np.array(["a", "b"]), None, "dtype"),
    ],
)
def test_bad_logits_are_rejected(logits: np.ndarray, vocab_size: int | None, pattern: str) -> None:
    for params in (GREEDY, SamplingParams(top_p=0.5)):
        with pytest.raises(ValueError, match=pattern):
            Sampler(params, vocab_size=vocab_size).sample(logits)


def test_logits_shorter_than_a_recorded_id_are_rejected() -> None:
    sampler = Sampler(SamplingParams(repetition_penalty=1.2), prompt_ids=[9])
    with pytest.raises(ValueError, match="token id 9"):
        sampler.sample(np.zeros(5, np.float32))


# --- greedy -----------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    for seed in range(5):
        logits = random_logits(1000, seed=seed)
        token = Sampler(GREEDY).sample(logits)
        assert token.token_id == int(np.argmax(logits))
        assert isinstance(token, SampledToken) and type(token.token_id) is int


def test_greedy_ties_go_to_the_lowest_id() -> None:
    logits = np.array([1.0, 5.0, 2.0, 5.0, 5.0], dtype=np.float32)
    assert Sampler(GREEDY).sample(logits).token_id == 1
    assert Sampler(SamplingParams(top_k=1, seed=3)).sample(logits).token_id == 1
    assert Sampler(SamplingParams(top_k=1)).distribution(logits)[0].tolist() == [1]


def test_greedy_ignores_the_seed() -> None:
    logits = random_logits(500, seed=1)
    tokens = {
        Sampler(SamplingParams(temperature=0.0, seed=seed)).sample(logits).token_id
        for seed in (None, 0, 1, 2**63)
    }
    assert tokens == {int(np.argmax(logits))}


# --- seeded draws -----------------------------------------------------------------------


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    logits = random_logits(1000, scale=0.5, seed=2)

    def run(seed: int | None) -> list[int]:
        sampler = Sampler(SamplingParams(seed=seed), vocab_size=1000)
        return [sampler.sample(logits).token_id for _ in range(200)]

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert run(None) != run(None)


def test_same_seed_same_tokens_through_every_stage() -> None:
    logits = random_logits(5000, scale=2.0, seed=3)
    params = SamplingParams(
        temperature=0.8, top_k=200, top_p=0.9, min_p=0.01, repetition_penalty=1.3, seed=7
    )

    def run() -> list[int]:
        sampler = Sampler(params, prompt_ids=[1, 2, 3])
        return [sampler.sample(logits).token_id for _ in range(200)]

    tokens = run()
    assert tokens == run() and len(set(tokens)) > 20


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_softmax_at_the_temperature(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, seed=1234)
    counts = draw_counts(params, FIVE, 20_000)
    expected = softmax64(FIVE, temperature)
    assert chi_square(counts, expected) < CHI2_BOUND, (counts, expected)
    ids, probabilities = Sampler(params).distribution(FIVE)
    assert ids.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6)


def test_temperature_sharpens_and_flattens() -> None:
    hot = draw_counts(SamplingParams(temperature=2.0, seed=5), FIVE, 5_000)
    cold = draw_counts(SamplingParams(temperature=0.5, seed=5), FIVE, 5_000)
    # The most likely token (3) gains share as the temperature drops, the least (2) loses it.
    assert cold[3] > hot[3] and cold[2] < hot[2]


def test_draws_over_a_large_vocabulary_follow_softmax() -> None:
    # Larger than the blocks the cumulative sums are split into (2048), with heavy tokens in
    # the first, second and later blocks, each its own bin, and the light ones in two more.
    n = 20_000
    logits = np.zeros(n, dtype=np.float32)
    heavy = [100, 2100, 3000, 4097, 19_999]
    logits[heavy] = math.log(3000.0)
    p = softmax64(logits)
    bins = np.zeros(n, dtype=np.int64)
    bins[heavy] = [1, 2, 3, 4, 5]
    bins[:4096][bins[:4096] == 0] = 6
    counts = np.bincount(bins[_draw_ids(SamplingParams(seed=11), logits, 20_000)], minlength=7)
    expected = np.bincount(bins, weights=p, minlength=7)
    assert chi_square(counts, expected) < CHI2_BOUND, (counts, expected)


def _draw_ids(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler.sample(logits).token_id for _ in range(n)])


def test_extreme_temperatures_stay_valid() -> None:
    logits = np.array([1.0, 3.0, -np.inf, 3.0, 2.0], dtype=np.float32)
    cold = Sampler(SamplingParams(temperature=1e-30, seed=1))
    assert {cold.sample(logits).token_id for _ in range(200)} == {1, 3}
    hot = Sampler(SamplingParams(temperature=1e30, seed=1))
    ids, probabilities = hot.distribution(logits)
    assert ids.tolist() == [0, 1, 3, 4]
    np.testing.assert_allclose(probabilities, 0.25)
    assert {hot.sample(logits).token_id for _ in range(400)} == {0, 1, 3, 4}


def test_masked_tokens_are_never_drawn() -> None:
    logits = random_logits(3000, seed=4)
    logits[::2] = -np.inf
    sampler = Sampler(SamplingParams(seed=2, presence_penalty=-2.0, repetition_penalty=0.5))
    tokens = [sampler.sample(logits).token_id for _ in range(500)]
    assert all(t % 2 == 1 for t in tokens)


# --- truncation -------------------------------------------------------------------------

TRUNCATIONS = [
    {"top_k": 3},
    {"top_k": 100},  # more than the vocabulary
    {"top_p": 0.5},
    {"top_p": 0.95, "temperature": 0.7},
    {"top_p": 1e-9},  # only the most likely
    {"min_p": 0.3},
    {"min_p": 1.0},
    {"top_k": 6, "top_p": 0.8, "min_p": 0.2, "temperature": 1.5},
    {"top_k": 10, "min_p": 0.05, "temperature": 0.5},
]


@pytest.mark.parametrize("options", TRUNCATIONS)
def test_truncation_keeps_exactly_the_allowed_tokens(options: dict[str, float]) -> None:
    logits = random_logits(40, scale=1.5, seed=8)
    logits[[5, 17]] = logits.max() + 0.25  # a tie for the most likely token
    params = SamplingParams(seed=9, **options)  # type: ignore[arg-type]
    allowed, expected = reference_distribution(logits, **options)  # type: ignore[arg-type]
    ids, probabilities = Sampler(params).distribution(logits)
    assert ids.tolist() == allowed.tolist()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)
    drawn = set(_draw_ids(params, logits, 2_000).tolist())
    assert drawn <= set(allowed.tolist())
    if len(allowed) <= 6:
        assert drawn == set(allowed.tolist())


def test_edge_cases_of_truncation() -> None:
    logits = np.array([0.5, 2.0, 1.0, 2.0, -1.0], dtype=np.float32)
    # top_p tiny and top_k 1: the single most likely token, the lower id of the tie.
    assert Sampler(SamplingParams(top_p=1e-12)).distribution(logits)[0].tolist() == [1]
    # min_p 1: every token as likely as the most likely one.
    ids, probabilities = Sampler(SamplingParams(min_p=1.0)).distribution(logits)
    assert ids.tolist() == [1, 3] and probabilities.tolist() == [0.5, 0.5]
    # top_k beyond the vocabulary keeps everything.
    assert Sampler(SamplingParams(top_k=99)).distribution(logits)[0].tolist() == [0, 1, 2, 3, 4]


def test_ties_at_the_truncation_boundary_keep_the_lower_ids() -> None:
    flat = np.zeros(8, dtype=np.float32)
    assert Sampler(SamplingParams(top_k=3)).distribution(flat)[0].tolist() == [0, 1, 2]
    assert Sampler(SamplingParams(top_p=0.3)).distribution(flat)[0].tolist() == [0, 1, 2]
    stepped = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=np.float32)
    assert Sampler(SamplingParams(top_k=4)).distribution(stepped)[0].tolist() == [0, 1, 3, 5]


def _top_mass(logits: np.ndarray, count: int) -> float:
    p = softmax64(logits)
    return float(np.sort(p)[::-1][:count].sum())


@pytest.mark.parametrize(
    ("n", "scale", "top_p", "candidates_hold_it"),
    [
        (5_000, 1.0, 0.9, False),  # flat: the 1024 most likely hold too little, full sort
        (5_000, 6.0, 0.9, True),  # peaked: the nucleus lies within the 1024 most likely
        (262_144, 1.0, 0.5, False),
        (262_144, 4.0, 0.5, True),
    ],
)
def test_top_p_candidate_path_and_full_sort_agree_with_reference(
    n: int, scale: float, top_p: float, candidates_hold_it: bool
) -> None:
    logits = random_logits(n, scale=scale, seed=n)
    assert (_top_mass(logits, 1024) >= top_p) == candidates_hold_it
    params = SamplingParams(top_p=top_p, seed=1)
    allowed, expected = reference_distribution(logits, top_p=top_p)
    ids, probabilities = Sampler(params).distribution(logits)
    assert ids.tolist() == allowed.tolist()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4)
    sampler = Sampler(params)
    assert all(sampler.sample(logits).token_id in set(allowed.tolist()) for _ in range(50))


def test_top_p_with_ties_spanning_the_candidate_boundary() -> None:
    # 3000 equally likely tokens all tie with the 1024th most likely: the nucleus is cut
    # inside the tie, at the lowest ids.
    flat = np.zeros(3000, dtype=np.float32)
    for top_p, count in ((0.2, 600), (0.5, 1500)):
        ids, _ = Sampler(SamplingParams(top_p=top_p)).distribution(flat)
        assert ids.tolist() == list(range(count))


# --- penalties --------------------------------------------------------------------------


def test_apply_penalties_exact_values() -> None:
    logits = np.array([2.0, -2.0, 0.0, 1.0, 3.0, -1.0], dtype=np.float32)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    result = apply_penalties(logits, params, prompt_ids=[0, 1, 0, 5], generated_ids=[3, 3, 4])
    expected = np.array(
        [
            2.0 / 2.0,  # prompt only: repetition (positive logit divided), no presence
            -2.0 * 2.0,  # prompt only: negative logit multiplied
            0.0,  # never seen
            1.0 / 2.0 - 0.5 - 0.25 * 2,  # generated twice
            3.0 / 2.0 - 0.5 - 0.25 * 1,  # generated once
            -1.0 * 2.0,  # prompt, once however often it occurs there
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(logits, [2.0, -2.0, 0.0, 1.0, 3.0, -1.0])


def test_presence_is_flat_frequency_scales_with_count() -> None:
    logits = np.zeros(4, dtype=np.float32)
    generated = [1, 2, 2, 3, 3, 3]
    presence = apply_penalties(logits, SamplingParams(presence_penalty=1.5), (), generated)
    frequency = apply_penalties(logits, SamplingParams(frequency_penalty=0.5), (), generated)
    assert presence.tolist() == [0.0, -1.5, -1.5, -1.5]
    assert frequency.tolist() == [0.0, -0.5, -1.0, -1.5]
    negative = apply_penalties(logits, SamplingParams(presence_penalty=-2.0), (), [0])
    assert negative.tolist() == [2.0, 0.0, 0.0, 0.0]


def test_prompt_counts_for_repetition_only() -> None:
    logits = np.array([1.0, 0.5, -3.0], dtype=np.float32)
    only_presence = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    sampler = Sampler(only_presence, prompt_ids=[0, 0, 0])
    assert sampler.sample(logits).token_id == 0  # the prompt's 0 is not penalised
    assert sampler.sample(logits).token_id == 1  # the generated 0 is: 1 - 4 < 0.5
    repetition = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    assert Sampler(repetition, prompt_ids=[0]).sample(logits).token_id == 1  # 1 / 4 < 0.5


def test_penalties_follow_generated_counts() -> None:
    logits = np.array([3.0, 2.5, 0.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    sampler = Sampler(params)
    counts = np.zeros(3)
    expected = []
    for _ in range(8):
        token = int(np.argmax(logits - counts))
        expected.append(token)
        counts[token] += 1
    assert [sampler.sample(logits).token_id for _ in range(8)] == expected


def test_accept_records_forced_tokens() -> None:
    logits = np.array([1.0, 0.9], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.5))
    sampler.accept(0)
    assert sampler.sample(logits).token_id == 1
    sampler.accept(np.int64(1))  # type: ignore[arg-type]
    assert sampler.sample(logits).token_id == 0


def test_sampler_distribution_uses_the_penalised_logits() -> None:
    logits = random_logits(300, seed=12)
    params = SamplingParams(
        temperature=0.9, repetition_penalty=1.7, presence_penalty=0.4, frequency_penalty=0.3
    )
    sampler = Sampler(params, prompt_ids=[1, 2, 3])
    generated = [4, 4, 5, 2]
    for token in generated:
        sampler.accept(token)
    penalised = apply_penalties(logits, params, [1, 2, 3], generated)
    assert not np.array_equal(penalised, logits)
    ids, probabilities = sampler.distribution(logits)
    assert ids.tolist() == list(range(300))
    np.testing.assert_allclose(probabilities, softmax64(penalised, 0.9), rtol=1e-5)


def test_extreme_penalties_stay_finite() -> None:
    logits = np.array([5.0, -5.0, 1.0, -np.inf], dtype=np.float32)
    tiny = apply_penalties(logits, SamplingParams(repetition_penalty=1e-300), [0, 1, 3])
    assert tiny[0] == np.finfo(np.float32).max and tiny[3] == -np.inf
    huge = apply_penalties(logits, SamplingParams(repetition_penalty=1e300), [0, 1, 3])
    assert huge[1] == -np.finfo(np.float32).max and huge[3] == -np.inf
    sampler = Sampler(SamplingParams(repetition_penalty=1e300, seed=0), prompt_ids=[0, 1, 2])
    ids, probabilities = sampler.distribution(logits)
    assert np.isfinite(probabilities).all() and 3 not in ids.tolist()


# --- log-probabilities ------------------------------------------------------------------


def test_logprobs_are_the_raw_top_n_in_order() -> None:
    logits = random_logits(2000, scale=2.0, seed=13)
    logits[[7, 70]] = logits.max() + 1.0  # tied most likely: 7 is listed before 70
    reference = log_softmax64(logits)
    params = SamplingParams(logprobs=5, seed=3, repetition_penalty=3.0, top_k=50)
    sampler = Sampler(params, prompt_ids=[7, 70])  # penalties do not change the logprobs
    for _ in range(20):
        token = sampler.sample(logits)
        order = np.lexsort((np.arange(2000), -reference))[:5]
        assert [i for i, _ in token.top_logprobs] == order.tolist()
        assert token.top_logprobs[0][0] == 7 and token.top_logprobs[1][0] == 70
        np.testing.assert_allclose(
            [lp for _, lp in token.top_logprobs], reference[order], rtol=0, atol=1e-5
        )
        assert token.logprob == pytest.approx(reference[token.token_id], abs=1e-5)


def test_logprobs_zero_gives_empty_and_large_gives_whole_vocabulary() -> None:
    logits = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    token = Sampler(SamplingParams(seed=1)).sample(logits)
    assert token.top_logprobs == ()
    assert token.logprob == pytest.approx(log_softmax64(logits)[token.token_id], abs=1e-6)
    full = Sampler(SamplingParams(logprobs=20, temperature=0.0)).sample(logits)
    assert [i for i, _ in full.top_logprobs] == [2, 1, 0]
    assert math.fsum(math.exp(lp) for _, lp in full.top_logprobs) == pytest.approx(1.0)
    assert full.token_id == 2 and full.logprob == full.top_logprobs[0][1]


# --- the input is left alone ------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(seed=1),
        SamplingParams(temperature=0.6, top_k=20, seed=1),
        SamplingParams(top_p=0.8, seed=1),
        SamplingParams(min_p=0.1, seed=1, logprobs=3),
        SamplingParams(
            temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=1.0
        ),
        SamplingParams(
            repetition_penalty=0.7, presence_penalty=-1.0, frequency_penalty=0.5, top_p=0.9, seed=2
        ),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_are_not_modified(params: SamplingParams, dtype: type[np.generic]) -> None:
    logits = random_logits(3000, scale=3.0, seed=14).astype(dtype)
    original = logits.copy()
    sampler = Sampler(params, prompt_ids=list(range(0, 3000, 7)))
    for _ in range(10):
        sampler.sample(logits)
    sampler.distribution(logits)
    apply_penalties(logits, params, [1, 2], [3])
    np.testing.assert_array_equal(logits, original)


def test_extreme_temperature_with_top_p_and_min_p_still_draws_a_token() -> None:
    # At temperature 1e30 every weight rounds to 1: top-p keeps the lowest ids, which need not
    # hold the top logit, and min-p must measure against the tokens it keeps.
    logits = np.linspace(-1.0, 1.0, 50, dtype=np.float32)
    params = SamplingParams(temperature=1e30, top_p=1e-300, min_p=1.0, seed=0)
    assert Sampler(params, []).sample(logits).token_id == 0
