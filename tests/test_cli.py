"""The `pygemma4` command line, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYGEMMA4_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "pygemma4", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cache,  # away from the source tree, so the installed package is imported
        timeout=300,
        check=False,
    )


def test_run_generates_from_the_demo_model(tmp_path):
    result = run_cli("run", "--max-tokens", "5", "--threads", "1", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout
    generated = next(
        line for line in result.stdout.splitlines() if line.startswith("generated ids")
    )
    ids = [int(x) for x in generated.split(":", 1)[1].strip(" []").split(",")]
    assert len(ids) == 5


def test_run_output_matches_the_engine(tmp_path, demo_model_file):
    from pygemma4 import Engine

    expected = Engine(demo_model_file, threads=1).generate([2, 40, 41], 6)
    result = run_cli(
        "run", str(demo_model_file), "--prompt-ids", "2,40,41", "--max-tokens", "6",
        cache=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"generated ids: {expected}" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/nonexistent/model.gguf"], "model.gguf"),
        (["run", "--prompt-ids", "2,x"], "integers"),
        (["run", "--prompt-ids", "2,99999"], "out of range"),
        (["run", "--max-tokens", "0"], "max-tokens"),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(tmp_path, args, message):
    result = run_cli(*args, cache=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"\x00" * 64)
    result = run_cli("run", str(bogus), cache=tmp_path)
    assert result.returncode == 1
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr
