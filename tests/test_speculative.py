"""Speculative decoding: with a drafter (the tiny assistant, or prompt lookup) the engine gives
the tokens it gives without one, greedy on every fixture file and quantization for k = 1..8,
stop tokens, stop strings, max_tokens and logprobs included; seeded sampling with drafting is
reproducible and keeps the target's distribution (the sampler's draft rule, and the engine
end to end); bad settings are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy import stats
from serve_helpers import ServeProcess, free_port, run_serve

from pygemma4 import AsyncClient, Engine
from pygemma4.drafter import DraftContext, DraftRequestError, NgramDrafter
from pygemma4.sampling import Sampler, SamplingParams
from pygemma4.speculative import DraftSettingsError, SpeculationStats

TOKENS = 40
KS = (1, 2, 3, 5, 8)


def model_files(fixtures_dir: Path) -> list[Path]:
    """Every text model of the fixtures: each quantization of tiny-e and tiny-moe, and the
    draft fixture's target."""
    files = [
        *sorted((fixtures_dir / "gemma4-tiny-e").glob("model-*.gguf")),
        *sorted((fixtures_dir / "gemma4-tiny-moe").glob("model-*.gguf")),
        fixtures_dir / "gemma4-tiny-draft" / "target-f32.gguf",
    ]
    assert len(files) == 9, files
    return files


def prompts(fixtures_dir: Path, model: Path) -> list[np.ndarray]:
    """The fixture's reference prompts of that model (one longer than the sliding window)."""
    if model.parent.name == "gemma4-tiny-draft":
        ref = np.load(model.parent / "ref_draft.npz")
        return [ref[f"p{i}/ids"] for i in range(3)]
    ref = np.load(model.parent / "ref.npz")
    return [ref[f"ids{i}"] for i in range(3)]


@pytest.fixture(scope="module")
def draft_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "gemma4-tiny-draft"


def test_ngram_drafts_give_the_same_greedy_tokens_on_every_fixture_file(fixtures_dir):
    for model in model_files(fixtures_dir):
        plain = Engine(model, threads=1)
        expected = [plain.generate(p, TOKENS, stop_tokens=()) for p in prompts(fixtures_dir, model)]
        for k in KS:
            drafted = Engine(model, threads=1, draft="ngram", draft_tokens=k)
            for prompt, tokens in zip(prompts(fixtures_dir, model), expected, strict=True):
                assert drafted.generate(prompt, TOKENS, stop_tokens=()) == tokens, (model, k)
            speculation = drafted.speculation
            assert speculation is not None and speculation.proposed > 0
            # Random weights repeat themselves: prompt lookup guesses much of it, so both
            # the kept and the rolled-back paths ran.
            assert 0 < speculation.accepted < speculation.proposed, (model, k)


@pytest.mark.parametrize("head", ["plain", "ordered"])
def test_assistant_drafts_give_the_same_greedy_tokens(draft_dir, fixtures_dir, head, request):
    """With the converted assistant (plain head) and with its centroid head (`ordered`)."""
    model = draft_dir / "target-f32.gguf"
    ref = np.load(draft_dir / "ref_draft.npz")
    if head == "ordered":
        assistant = request.getfixturevalue("ordered_drafter")
    else:
        assistant = draft_dir / "assistant-f32.gguf"
    plain = Engine(model, threads=1)
    expected = [plain.generate(p, TOKENS, stop_tokens=()) for p in prompts(fixtures_dir, model)]
    for k in range(1, 9):
        engine = Engine(model, threads=1, draft=assistant, draft_tokens=k)
        for i, prompt in enumerate(prompts(fixtures_dir, model)):
            tokens = engine.generate(prompt, TOKENS, stop_tokens=())
            assert tokens == expected[i], (k, i)
            assert tokens[:24] == ref[f"p{i}/greedy"].tolist(), (k, i)
            # transformers' own assisted generation gives the target's greedy tokens too.
            assert tokens[:24] == ref[f"p{i}/{head}/assisted"].tolist(), (k, i)
        speculation = engine.speculation
        assert speculation is not None and speculation.steps > 0
        assert len(speculation.acceptance_per_position()) == k


@pytest.fixture(scope="module")
def tiny_e(fixtures_dir: Path) -> Path:
    return fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf"


def test_stops_lengths_and_logprobs_are_as_without_drafting(tiny_e, fixtures_dir):
    plain = Engine(tiny_e, threads=1)
    drafted = Engine(tiny_e, threads=1, draft="ngram", draft_tokens=6)
    prompt = prompts(fixtures_dir, tiny_e)[1]
    free = plain.generate(prompt, TOKENS, stop_tokens=())
    # A stop token met in the middle of an accepted run of drafts ends the output there,
    # with nothing after it.
    stop = free[len(free) // 2]
    for max_tokens in (1, 2, 7, TOKENS):
        assert drafted.generate(prompt, max_tokens, stop_tokens=[stop]) == plain.generate(
            prompt, max_tokens, stop_tokens=[stop]
        )
    # A stop string cuts the text at the same token, text equal.
    text = plain.tokenizer.decode(free)
    stop_string = text[len(text) // 3 : len(text) // 3 + 3]
    sampling = SamplingParams(stop=(stop_string,), logprobs=3)

    def run(engine: Engine) -> tuple[list[int], str, str | None, list]:
        chunks = list(engine.stream(prompt, TOKENS, sampling, stop_tokens=()))
        logprobs = [(c.sampled.logprob, c.sampled.top_logprobs) for c in chunks]
        return (
            [c.token_id for c in chunks],
            "".join(c.text for c in chunks),
            chunks[-1].finish_reason,
            logprobs,
        )

    tokens, text, reason, logprobs = run(drafted)
    expected_tokens, expected_text, expected_reason, expected_logprobs = run(plain)
    assert (tokens, text, reason) == (expected_tokens, expected_text, expected_reason)
    assert reason == "stop" and stop_string not in text
    for (logprob, top), (want, want_top) in zip(logprobs, expected_logprobs, strict=True):
        assert logprob == pytest.approx(want, abs=1e-4)
        assert [t for t, _ in top] == [t for t, _ in want_top]
        np.testing.assert_allclose([v for _, v in top], [v for _, v in want_top], atol=1e-4)


def test_seeded_sampling_with_drafting_is_reproducible(tiny_e, draft_dir, fixtures_dir):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    prompt = prompts(fixtures_dir, tiny_e)[0]
    for model, draft in [(tiny_e, "ngram"), (draft_dir / "target-f32.gguf", None)]:
        draft = draft or draft_dir / "assistant-f32.gguf"
        runs = [
            Engine(model, threads=1, draft=draft, draft_tokens=4).generate(
                prompt if model == tiny_e else prompts(fixtures_dir, model)[0], TOKENS, params
            )
            for _ in range(2)
        ]
        assert runs[0] == runs[1]


def test_the_draft_rule_keeps_the_samplers_distribution():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 1.5, 32).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=12, min_p=0.02)
    ids, probabilities = Sampler(params).distribution(logits)
    draws = 40_000
    for draft in (int(ids[np.argmax(probabilities)]), int(ids[np.argmin(probabilities)]), 31):
        counts = np.zeros(32)
        for seed in range(draws):
            sampler = Sampler(SamplingParams(**{**params.to_dict(), "seed": seed}))
            counts[sampler.sample(logits, draft=draft).token_id] += 1
        assert counts[np.setdiff1d(np.arange(32), ids)].sum() == 0
        test = stats.chisquare(counts[ids], probabilities * draws)
        assert test.pvalue > 0.01, (draft, test)


def test_engine_sampling_with_drafting_keeps_the_targets_distribution(tiny_e, fixtures_dir):
    # The first two tokens of each run are verified against drafts (prompt lookup finds the
    # prompt's repeated tokens); their distributions over many seeds equal those without.
    prompt = np.tile(prompts(fixtures_dir, tiny_e)[0][:6], 3)
    runs = 600

    def first_two(engine: Engine) -> np.ndarray:
        return np.array(
            [
                engine.generate(prompt, 2, SamplingParams(temperature=4.0, top_k=6, seed=seed), ())
                for seed in range(runs)
            ]
        )

    drafted_engine = Engine(tiny_e, threads=1, draft="ngram", draft_tokens=3)
    drafted = first_two(drafted_engine)
    plain = first_two(Engine(tiny_e, threads=1))
    assert drafted_engine.speculation is not None and drafted_engine.speculation.proposed >= runs
    for position in (0, 1):
        samples = (drafted[:, position], plain[:, position])
        values = np.union1d(*samples)
        table = np.array([[np.sum(sample == v) for v in values] for sample in samples])
        table = table[:, table.sum(axis=0) >= 10]  # chi-square needs populated cells
        assert table.shape[1] >= 2
        assert stats.chi2_contingency(table).pvalue > 0.01, position


def test_prompt_lookup_proposes_what_followed_the_last_tokens():
    drafter = NgramDrafter(max_ngram=3)

    def propose(tokens: list[int], k: int) -> list[int]:
        context = DraftContext(kv=None, tokens=np.array(tokens, dtype=np.int32))  # type: ignore[arg-type]
        return drafter.propose([context], k)[0].tolist()

    assert propose([1, 2, 3, 4, 9, 2, 3], 3) == [4, 9, 2]
    assert propose([5, 6, 7, 8], 2) == []  # nothing seen before
    assert propose([1, 2, 7, 1, 2, 8, 1, 2], 2) == [8, 1]  # the newest occurrence
    assert propose([4, 4, 4, 4], 3) == [4, 4, 4]  # a shorter n-gram, followed by k tokens
    assert propose([3, 4, 3, 5, 6, 3], 3) == [5, 6, 3]  # the longest continuation there is
    with pytest.raises(DraftRequestError, match="n-gram sizes"):
        NgramDrafter(max_ngram=0)


def test_bad_draft_settings_are_refused(draft_dir):
    model = draft_dir / "target-f32.gguf"
    for k in (0, 17, True):
        with pytest.raises(DraftSettingsError, match="draft tokens"):
            Engine(model, threads=1, draft="ngram", draft_tokens=k)
    with pytest.raises(DraftSettingsError, match="within a step of 4"):
        Engine(model, threads=1, draft="ngram", draft_tokens=4, n_batch=4)


def test_acceptance_is_counted_per_position():
    counted = SpeculationStats()
    counted.record(4, 2)
    counted.record(2, 2)
    counted.record(3, 0)
    assert counted.to_dict() == {
        "steps": 3,
        "proposed": 9,
        "accepted": 4,
        "acceptance_rate": 4 / 9,
        "acceptance_per_position": [2 / 3, 2 / 3, 0.0, 0.0],
        "draft_seconds": 0.0,
    }


@pytest.mark.parametrize("draft", ["assistant", "ngram"])
def test_the_server_drafts_for_16_concurrent_streams_with_the_engines_tokens(
    draft_dir, fixtures_dir, tmp_path, draft
):
    model = draft_dir / "target-f32.gguf"
    drafter = str(draft_dir / "assistant-f32.gguf") if draft == "assistant" else "ngram"
    ref = np.load(draft_dir / "ref_draft.npz")
    # 16 prompts: the fixture's, each also continued by some of its greedy tokens.
    requests = [
        np.concatenate([ref[f"p{i}/ids"], ref[f"p{i}/greedy"][:j]])
        for i in range(3)
        for j in (0, 2, 3, 5, 7, 11)
    ][:16]
    plain = Engine(model, threads=1)
    expected = [plain.generate(prompt, TOKENS, stop_tokens=()) for prompt in requests]
    listen = f"127.0.0.1:{free_port()}"
    args = ("--threads", "1", "--max-batch", "8", "--draft", drafter, "--draft-tokens", "3")
    with ServeProcess.running(model, tmp_path, *args, "--http", listen) as server:

        async def run() -> list[list[int]]:
            async with AsyncClient(server.endpoint, timeout=60) as client:

                async def one(prompt: np.ndarray) -> list[int]:
                    tokens: list[int] = []
                    stream = client.stream(prompt.tolist(), TOKENS, temperature=0, ignore_eos=True)
                    async for chunk in stream:
                        tokens += chunk.token_ids
                    return tokens

                return list(await asyncio.gather(*(one(p) for p in requests)))

        assert asyncio.run(run()) == expected
        with server.client() as client:
            info = client.info()
            assert info.draft == Path(drafter).name and info.draft_tokens == 3
            assert info.speculation is not None and info.speculation.proposed > 0
            assert client.health().speculation == info.speculation
            metrics = httpx.get(f"http://{listen}/metrics", timeout=30).text
            counted = {
                line.split()[0]: float(line.split()[1])
                for line in metrics.splitlines()
                if line.startswith("pygemma4:spec_decode_")
            }
            assert (
                counted["pygemma4:spec_decode_num_draft_tokens_total"] == info.speculation.proposed
            )
            assert counted["pygemma4:spec_decode_num_accepted_tokens_total"] == (
                info.speculation.accepted
            )
            per_position = 'pygemma4:spec_decode_num_accepted_tokens_per_pos_total{position="0"}'
            assert counted[per_position] == info.speculation.accepted_at[0]
            opted_out = client.complete(
                requests[0].tolist(), TOKENS, temperature=0, ignore_eos=True, speculative=False
            )
            assert list(opted_out.token_ids) == expected[0]
            # The request drafted nothing: the counts did not move.
            assert client.info().speculation == info.speculation


def test_serve_refuses_a_drafter_that_does_not_belong(draft_dir, fixtures_dir, tmp_path):
    tiny_e = fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf"
    result = run_serve(tiny_e, "--draft", str(draft_dir / "assistant-f32.gguf"), cwd=tmp_path)
    assert result.returncode == 1 and "does not fit target" in result.stderr, result.stderr
    result = run_serve(tiny_e, "--draft", "ngram", "--draft-tokens", "0", cwd=tmp_path)
    assert result.returncode == 2 and "--draft-tokens" in result.stderr, result.stderr
