"""What the fuzz targets share: their corpora, a scratch file for inputs that must be files, and
the command line that runs a target under atheris.

A target is a module `fuzz_<name>.py` in this folder with a `fuzz_one(data: bytes) -> None`
that may raise only `Gemma4Error` subclasses: any other exception, a crash or a hang is a
finding. `fuzz_one` needs nothing but pygemma4, so that tests/test_fuzz_corpus.py replays the
corpora without atheris; only `main` imports atheris.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FunctionType, ModuleType

from pygemma4.errors import Gemma4Error
from pygemma4.models.demo import demo_vocabulary
from pygemma4.models.vocabulary import tokenizer_metadata
from pygemma4.tokenizer import Tokenizer

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_ROOT = FUZZ_DIR / "corpus"
# The package whose Python code atheris instruments for coverage (the workers included, as
# pygemma4.workers); the rest (numpy, jinja2, pydantic, ...) runs uninstrumented, so that
# executions stay fast and coverage means ours.
INSTRUMENTED_PACKAGE = "pygemma4"

_scratch_fd: int | None = None


def target_names() -> list[str]:
    """The names of the fuzz targets in this folder (`fuzz_<name>.py`)."""
    return sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_DIR.glob("fuzz_*.py"))


def corpus_dir(target: str) -> Path:
    """Where the seeds and regression inputs of `target` are kept."""
    return CORPUS_ROOT / target


def scratch_file(data: bytes) -> Path:
    """`data` as the content of this process's scratch file, for code under test that reads
    paths: a memory file without a name (its path is /proc/self/fd/N), so that nothing is
    left behind however the process ends (libFuzzer leaves without Python's cleanup)."""
    global _scratch_fd
    if _scratch_fd is None:
        _scratch_fd = os.memfd_create("pygemma4-fuzz")
    os.ftruncate(_scratch_fd, 0)
    os.pwrite(_scratch_fd, data, 0)
    return Path(f"/proc/self/fd/{_scratch_fd}")


def text_of(data: bytes) -> str:
    """`data` as text: UTF-8, with bytes that are not UTF-8 kept as lone surrogates (text no
    client can send as JSON, but Python callers can pass)."""
    return data.decode("utf-8", "surrogateescape")


def demo_tokenizer(chat_template: str | None = None) -> Tokenizer:
    """The demo model's tokenizer, with `chat_template` or else the built-in Gemma 4 one."""
    metadata = tokenizer_metadata(demo_vocabulary())
    if chat_template is not None:
        metadata["tokenizer.chat_template"] = chat_template
    return Tokenizer.from_metadata(metadata)


def main(fuzz_one: Callable[[bytes], None]) -> None:
    """Run `fuzz_one` under atheris with libFuzzer's command line (sys.argv): a Gemma4Error is
    the expected answer to bad input, anything else stops the run as a finding."""
    import atheris

    def test_one(data: bytes) -> None:
        with contextlib.suppress(Gemma4Error):
            fuzz_one(data)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == INSTRUMENTED_PACKAGE and module is not None:
            for function in _functions_of(module):
                atheris.instrument_func(function)
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


def _functions_of(module: ModuleType) -> Iterator[FunctionType]:
    """The functions and methods `module` defines (not those it imports)."""
    for value in list(vars(module).values()):
        members = list(vars(value).values()) if isinstance(value, type) else [value]
        for member in members:
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            elif isinstance(member, property):
                member = member.fget
            if isinstance(member, FunctionType) and member.__module__ == module.__name__:
                yield member
