"""The `pygemma4` command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pygemma4 import Engine, SamplingParams, Tokenizer


def run_cli(*args: str, cache: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYGEMMA4_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "pygemma4", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        cwd=cache,  # away from the source tree, so the installed package is imported
        timeout=300,
        check=False,
    )


def generate_json(*args: str, cache: Path, stdin: str | None = None) -> dict:
    result = run_cli("generate", *args, "--json", "--threads", "1", cache=cache, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_streams_from_the_demo_model(tmp_path: Path) -> None:
    result = run_cli("generate", "Hello", "--max-tokens", "5", "--threads", "1", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stderr
    assert "tokens/s" in result.stderr
    assert result.stdout.endswith("\n")


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_generate_equals_the_engine(
    tmp_path: Path, demo_model_file: Path, chat: bool
) -> None:
    engine = Engine(demo_model_file, threads=1)
    if chat:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    else:
        ids = engine.tokenizer.encode("Hello there")
    expected = engine.generate(ids, 12)
    args = [str(demo_model_file), "Hello there", "--max-tokens", "12"]
    result = generate_json(*args, *(["--chat"] if chat else []), cache=tmp_path)
    assert result["token_ids"] == expected
    assert result["prompt_tokens"] == len(ids)
    ends = engine.tokenizer.end_of_generation_ids
    text = engine.tokenizer.decode([t for t in expected if t not in ends], skip_special=True)
    assert result["text"] == text


def test_seeded_sampling_repeats_and_matches_the_engine(
    tmp_path: Path, demo_model_file: Path
) -> None:
    args = [str(demo_model_file), "Once", "--temperature", "0.9", "--top-k", "50"]
    first = generate_json(*args, "--seed", "11", "--max-tokens", "10", cache=tmp_path)
    again = generate_json(*args, "--seed", "11", "--max-tokens", "10", cache=tmp_path)
    assert first["token_ids"] == again["token_ids"]
    engine = Engine(demo_model_file, threads=1)
    params = SamplingParams(temperature=0.9, top_k=50, seed=11)
    assert engine.generate(engine.tokenizer.encode("Once"), 10, params) == first["token_ids"]


def test_prompt_from_stdin_and_system_turn(tmp_path: Path, demo_model_file: Path) -> None:
    piped = generate_json(str(demo_model_file), "-", "--max-tokens", "3", cache=tmp_path,
                          stdin="Hello there")  # fmt: skip
    direct = generate_json(str(demo_model_file), "Hello there", "--max-tokens", "3", cache=tmp_path)
    assert piped["token_ids"] == direct["token_ids"]
    chat = generate_json(
        str(demo_model_file), "Hi", "--chat", "--system", "Be brief.", "--max-tokens", "2",
        cache=tmp_path,
    )  # fmt: skip
    tokenizer = Tokenizer.from_gguf(demo_model_file)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat["prompt_tokens"] == len(tokenizer.encode_chat(messages))


def test_stdin_that_is_not_utf8(tmp_path: Path, demo_model_file: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pygemma4", "generate", str(demo_model_file), "-"],
        input=b"caf\xe9",
        capture_output=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1
    assert b"not UTF-8" in result.stderr
    assert b"Traceback" not in result.stderr


def test_logprobs_and_ignore_eos(tmp_path: Path, demo_model_file: Path) -> None:
    result = generate_json(
        str(demo_model_file), "Hi", "--max-tokens", "4", "--logprobs", "2", "--ignore-eos",
        cache=tmp_path,
    )  # fmt: skip
    assert len(result["token_ids"]) == 4
    assert result["finish_reason"] == "length"
    assert [len(entry["top"]) for entry in result["logprobs"]] == [2] * 4
    shown = run_cli(
        "generate", str(demo_model_file), "Hi", "--max-tokens", "2", "--logprobs", "2",
        cache=tmp_path,
    )  # fmt: skip
    assert "log-probabilities" in shown.stderr


def test_inspect(tmp_path: Path, fixtures_dir: Path) -> None:
    model = fixtures_dir / "gemma4-tiny-moe" / "model-Q4_K_M.gguf"
    shown = run_cli("inspect", str(model), "--tensors", "--template", cache=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for needle in ("gemma4", "experts", "Q4_K", "blk.0.ffn_gate_inp.weight", "<turn|>", "V = K"):
        assert needle in shown.stdout
    as_json = run_cli("inspect", str(model), "--json", cache=tmp_path)
    info = json.loads(as_json.stdout)
    assert info["config"]["n_expert"] == 4
    assert info["tokenizer"]["vocab_size"] == info["config"]["vocab_size"]
    assert info["tokenizer"]["chat_template"]["source"] == "file"
    assert sum(t["bytes"] for t in info["tensors"]) == info["tensor_bytes"]
    assert {e["text"] for e in info["tokenizer"]["end_of_generation"]} == {"<eos>", "<turn|>"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "/nonexistent/model.gguf", "Hi"], "model.gguf"),
        (["generate", "Hi", "--max-tokens", "0"], "max-tokens"),
        (["generate", "Hi", "--temperature", "-1"], "temperature"),
        (["generate", "Hi", "--top-p", "1.5"], "top_p"),
        (["generate", "Hi", "--logprobs", "50"], "logprobs"),
        (["generate", "Hi", "--system", "x"], "--system needs --chat"),
        (["generate", "a", "b", "c"], "[MODEL] PROMPT"),
        (["generate"], "PROMPT"),
        (["generate", "Hi", "--n-ctx", "2"], "longer than the context"),
        (["inspect", "/nonexistent/model.gguf"], "no such file"),
        (["generate", "Hi", "--n-ctx", "99999999999"], "more than the core addresses"),
        (["generate", "Hi", "--n-ctx", "2000000000"], "cannot allocate a KV pool"),
        (["keygen", "keys", "../outside"], "must be a plain file name"),
        (["serve", "--max-logprobs", "21", "--http", "off"], "more than the engine takes (20)"),
    ],
)
def test_bad_input_is_a_message_not_a_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run_cli(*args, cache=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_a_file_that_is_not_gguf(tmp_path: Path, command: str) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"\x00" * 64)
    args = [str(bogus), "Hi"] if command == "generate" else [str(bogus)]
    result = run_cli(command, *args, cache=tmp_path)
    assert result.returncode == 1
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_gguf_that_is_not_gemma4(tmp_path: Path, demo_model_file: Path) -> None:
    from conftest import rewrite_gguf

    other = rewrite_gguf(demo_model_file, tmp_path / "llama.gguf", {}, architecture="llama")
    for args in (["generate", str(other), "Hi"], ["inspect", str(other)]):
        result = run_cli(*args, cache=tmp_path)
        assert result.returncode == 1
        assert "llama" in result.stderr
        assert "Traceback" not in result.stderr
