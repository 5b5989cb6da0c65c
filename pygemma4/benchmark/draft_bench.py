"""`pygemma4 bench MODEL --draft FILE|ngram`: what speculative decoding gives on a model.

Greedy generation of the same prompt with and without drafting, alternating (tokens/s side by
side, the tokens checked equal, acceptance per draft position), then the cost of verifying
1..k+1 tokens in one call against one decode step (measured, `verify_cost`), and from those
costs the speed that the acceptance rates published for Google's assistants would give: a
model, labelled as one, since a random-weight model's acceptance means nothing.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pygemma4.benchmark.tokens import BOS, random_ids
from pygemma4.benchmark.verify_cost import VerificationCost, verification_costs
from pygemma4.engine import Engine
from pygemma4.speculative import SpeculationStats

PUBLISHED_ACCEPTANCE = (0.8, 0.6, 0.4, 0.27)
"""Acceptance per draft position reported for Google's Gemma 4 assistants on real prompts."""

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
"""The prompt of a model that carries a tokenizer (as a chat turn); others get random ids."""


@dataclass(frozen=True)
class ModelledSpeed:
    """The decode speed drafting `k` tokens gives at the published acceptance rates, from the
    measured costs: tokens per step over the step's cost in plain decode steps."""

    k: int
    tokens_per_step: float
    step_cost: float
    tokens_per_s: float


@dataclass(frozen=True)
class DraftBenchResult:
    """The figures of one drafting benchmark."""

    model: str
    draft: str
    draft_tokens: int
    threads: int
    prompt_tokens: int
    generated_tokens: int
    repetitions: int
    plain_tokens_per_s: float
    drafted_tokens_per_s: float
    identical: bool
    """Whether every drafted run gave the plain run's tokens."""
    speculation: SpeculationStats
    verification: dict[int, VerificationCost] = field(default_factory=dict)

    @property
    def draft_cost(self) -> float:
        """Drafting's time per verification step, in plain decode steps."""
        if not self.speculation.steps:
            return 0.0
        per_step = self.speculation.draft_seconds / self.speculation.steps
        return per_step * self.plain_tokens_per_s

    def modelled(self) -> list[ModelledSpeed]:
        """The modelled speed for each k up to the drafted one and the published rates."""
        speeds = []
        for k in range(1, min(self.draft_tokens, len(PUBLISHED_ACCEPTANCE)) + 1):
            cost = self.verification[k + 1].ratio + self.draft_cost
            tokens = 1 + sum(PUBLISHED_ACCEPTANCE[:k])
            speeds.append(ModelledSpeed(k, tokens, cost, self.plain_tokens_per_s * tokens / cost))
        return speeds

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "draft": self.draft,
            "draft_tokens": self.draft_tokens,
            "threads": self.threads,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "repetitions": self.repetitions,
            "plain_tokens_per_s": self.plain_tokens_per_s,
            "drafted_tokens_per_s": self.drafted_tokens_per_s,
            "identical": self.identical,
            "speculation": self.speculation.to_dict(),
            "draft_cost_in_steps": self.draft_cost,
            "verification": {
                str(n): {"seconds": c.seconds, "ratio": c.ratio}
                for n, c in self.verification.items()
            },
            "modelled_at_published_acceptance": {
                "acceptance_per_position": list(PUBLISHED_ACCEPTANCE),
                "speeds": [vars(m) for m in self.modelled()],
            },
        }


def bench_drafting(
    path: str | os.PathLike[str],
    draft: str,
    draft_tokens: int,
    *,
    threads: int,
    generate_tokens: int = 128,
    repetitions: int = 3,
    backend: str = "cpu",
    device: int = 0,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> DraftBenchResult:
    """Measure drafting with `draft` ("ngram" or an assistant GGUF) on the model at `path`:
    `repetitions` greedy runs decoding `generate_tokens` tokens after the first each way, then
    the verification costs."""
    progress("loading the model and the drafter")
    engine = Engine(path, backend, threads, draft=draft, draft_tokens=draft_tokens, device=device)
    if engine.has_tokenizer:
        prompt = np.array(engine.tokenizer.encode_chat([{"role": "user", "content": PROMPT}]))
    else:
        rng = np.random.default_rng(seed)
        prompt = np.concatenate([[BOS], random_ids(rng, engine.vocab_size, 63)])
    speculation = engine.speculation
    assert speculation is not None  # the engine has a drafter
    seconds: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[list[int]]] = {False: [], True: []}
    for repetition in range(repetitions):
        for speculative in (False, True):
            progress(
                f"run {repetition + 1}/{repetitions}, {'drafting' if speculative else 'plain'}"
            )
            # Decode only: from the first token (after the prompt's prefill) to the last.
            chunks = engine.stream(prompt, generate_tokens + 1, None, (), speculative)
            tokens = [next(chunks).token_id]
            start = time.perf_counter()
            tokens += [chunk.token_id for chunk in chunks]
            seconds[speculative].append(time.perf_counter() - start)
            outputs[speculative].append(tokens)
    identical = all(tokens == outputs[False][0] for tokens in outputs[True] + outputs[False])
    result = DraftBenchResult(
        model=Path(path).name,
        draft=Path(draft).name if draft != "ngram" else draft,
        draft_tokens=draft_tokens,
        threads=threads,
        prompt_tokens=len(prompt),
        generated_tokens=generate_tokens,
        repetitions=repetitions,
        plain_tokens_per_s=generate_tokens / statistics.median(seconds[False]),
        drafted_tokens_per_s=generate_tokens / statistics.median(seconds[True]),
        identical=identical,
        speculation=speculation,
    )
    del engine  # its weights make way for the verification runner's
    progress("measuring the cost of verifying 1..k+1 tokens")
    costs = verification_costs(
        path,
        threads,
        range(1, draft_tokens + 2),
        context=len(prompt),
        backend=backend,
        device=device,
        seed=seed,
    )
    return dataclasses.replace(result, verification=costs)
