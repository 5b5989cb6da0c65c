"""Every fuzz target (tests/fuzz) replays every corpus: the seeds and each input fuzzing once
found failing must give nothing but a Gemma4Error, through every target (an input of one
target is odd input for another, which is worth trying too)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pygemma4.errors import Gemma4Error

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ_DIR))

from harness import CORPUS_ROOT, target_names  # noqa: E402

CORPUS = sorted(p for p in CORPUS_ROOT.glob("*/*") if p.is_file())


def test_every_target_has_a_corpus() -> None:
    for target in target_names():
        assert any(p.parent.name == target for p in CORPUS), f"{target} has no corpus"


def _fuzz_one(target: str) -> Callable[[bytes], None]:
    return importlib.import_module(f"fuzz_{target}").fuzz_one


@pytest.mark.parametrize("target", target_names())
def test_the_corpora_give_only_gemma4_errors(target: str) -> None:
    fuzz_one = _fuzz_one(target)
    failures = []
    for path in CORPUS:
        try:
            fuzz_one(path.read_bytes())
        except Gemma4Error:
            pass
        except Exception as e:
            failures.append(f"{path.relative_to(CORPUS_ROOT)}: {_shown(e)}")
    assert not failures, f"fuzz target {target} failed on:\n" + "\n".join(failures)


def _shown(error: Exception, limit: int = 300) -> str:
    """The error's type and the start of its message (inputs can be large)."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + "..."
