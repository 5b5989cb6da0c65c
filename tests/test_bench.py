"""`pygemma4 bench`: the model benchmark, its engines' runners and their processes, and
`bench serve` run as a real process against real servers."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from pygemma4 import Engine, _core
from pygemma4.benchmark.isolation import IsolatedRunner, RunnerFailedError
from pygemma4.benchmark.model_bench import (
    BenchPlan,
    BenchResult,
    BenchTest,
    bench_model,
    bench_workload,
)
from pygemma4.benchmark.report import model_bench_notes
from pygemma4.benchmark.runners import LlamaCppRunner, Pygemma4Runner, RunnerSpec
from pygemma4.benchmark.schedule import choose_schedule, footprint_bytes, repacked_bytes
from pygemma4.benchmark.server_process import started_server
from pygemma4.benchmark.stats import Percentiles, Spread
from pygemma4.benchmark.tokens import BOS
from pygemma4.config import open_model
from pygemma4.kv import KvLayout
from pygemma4.memory import memory_available_bytes
from pygemma4.model_info import decode_read_bytes, decode_read_share
from pygemma4.models.synthetic import cache_file_name, write_synthetic_model

MODEL = "gemma4-tiny-e/model-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def model_file(fixtures_dir: Path) -> Path:
    return fixtures_dir / MODEL


def run_bench(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pygemma4", "bench", *args],
        capture_output=True,
        text=True,
        cwd=cwd,  # away from the source tree, so the installed package is imported
        env={**os.environ, "COLUMNS": "120", **(env or {})},
        timeout=300,
        check=False,
    )


def test_bench_measures_every_test_and_writes_json(tmp_path: Path, model_file: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        str(model_file), "-p", "8,16", "-n", "4", "--batch", "1,2", "-r", "2", "-t", "1",
        "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("pp8", "pp16", "tg4", "tg4 x2", "load (s)", "peak memory"):
        assert name in result.stdout
    assert "over 2 runs after 1 warm-up" in result.stdout
    document = json.loads(out.read_text())
    assert document["model"]["decode_bytes"] == decode_read_bytes(open_model(model_file))
    assert document["model"]["file_type"] == "Q4_K_M"
    assert document["plan"]["batches"] == [1, 2]
    (engine,) = document["engines"]
    assert engine["engine"] == "pygemma4"
    assert engine["load_s"] > 0 and engine["peak_rss_bytes"] > 10**6
    assert set(engine["tokens_per_s"]) == {"pp8", "pp16", "tg4", "tg4 x2"}
    for figure in engine["tokens_per_s"].values():
        assert figure["runs"] == 2 and figure["mean"] > 0 and figure["std"] >= 0
    assert document["ratios"] == {} and document["skipped"] == {}
    bandwidth = document["decode_weight_bytes_per_s"]["pygemma4"]
    assert bandwidth["tg4"] == pytest.approx(
        engine["tokens_per_s"]["tg4"]["mean"] * document["model"]["decode_bytes"]
    )
    assert bandwidth["tg4 x2"] == pytest.approx(
        engine["tokens_per_s"]["tg4 x2"]["mean"] / 2 * document["model"]["decode_bytes"]
    )
    # The read ceiling of this machine: above a plain copy's worst case, below any DRAM's best.
    assert 1e8 < document["memory_read_bytes_per_s"] < 1e13


def test_compare_runs_llama_cpp_on_the_same_work(tmp_path: Path, model_file: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        str(model_file), "-p", "16", "-n", "4", "--batch", "1,3", "-r", "2", "-t", "1",
        "--compare", "llamacpp", "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "llama.cpp t/s" in result.stdout and "interleaved" in result.stdout
    document = json.loads(out.read_text())
    assert document["schedule"]["kind"] == "interleaved"
    figures = {e["engine"]: e["tokens_per_s"] for e in document["engines"]}
    assert set(figures) == {"pygemma4", "llamacpp"}
    for test in ("pp16", "tg4", "tg4 x3"):
        expected = figures["pygemma4"][test]["mean"] / figures["llamacpp"][test]["mean"]
        assert document["ratios"][test] == pytest.approx(expected)
        assert figures["llamacpp"][test]["runs"] == 2


def test_both_engines_store_the_kv_type_asked_for(tmp_path: Path, model_file: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(
        str(model_file), "-p", "16", "-n", "4", "-r", "1", "-t", "1", "--kv-dtype", "q8_0",
        "--compare", "llamacpp", "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "KV q8_0" in result.stdout
    document = json.loads(out.read_text())
    assert document["kv_dtype"] == "q8_0"
    assert {e["engine"] for e in document["engines"]} == {"pygemma4", "llamacpp"}
    default = run_bench(str(model_file), "-p", "8", "-n", "0", "-r", "1", "-t", "1", cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert "KV f16" in default.stdout
    bad = run_bench(str(model_file), "--kv-dtype", "q4", cwd=tmp_path)
    assert bad.returncode == 1
    assert "unknown KV type 'q4': expected one of f32, f16, bf16, q8_0" in bad.stderr


def bench_both_engines(
    model_file: Path, plan: BenchPlan, memory_available: int
) -> tuple[BenchResult, list[str]]:
    """bench_model on pygemma4 and llama.cpp; returns the result and the progress messages,
    each followed by the names of the benchmark processes alive when it was reported."""
    messages: list[str] = []

    def progress(message: str) -> None:
        alive = sorted(p.name for p in multiprocessing.active_children())
        messages.append(f"{message} {alive}")

    result = bench_model(
        model_file,
        plan,
        ("pygemma4", "llamacpp"),
        threads=1,
        progress=progress,
        memory_available=memory_available,
    )
    return result, messages


def test_runs_interleave_after_the_warm_ups_where_both_engines_fit(model_file: Path) -> None:
    plan = BenchPlan(prompt_sizes=(8,), decode_tokens=2, repetitions=2, warmup=1)
    result, messages = bench_both_engines(model_file, plan, memory_available=1 << 50)
    both = "['bench-llamacpp', 'bench-pygemma4']"
    assert [m for m in messages if m.startswith(("pp8", "loading"))] == [
        "loading model-Q4_K_M.gguf in pygemma4 []",
        "loading model-Q4_K_M.gguf in llama.cpp ['bench-pygemma4']",
        f"pp8: pygemma4 warm-up 1/1 {both}",
        f"pp8: llama.cpp warm-up 1/1 {both}",
        f"pp8: pygemma4 run 1/2 {both}",
        f"pp8: llama.cpp run 1/2 {both}",
        f"pp8: pygemma4 run 2/2 {both}",
        f"pp8: llama.cpp run 2/2 {both}",
    ]
    assert all(e.tokens_per_s["pp8"].runs == 2 for e in result.engines)
    assert result.schedule is not None and result.schedule.kind == "interleaved"
    notes = model_bench_notes(result)
    assert notes[0].endswith("; the engines' runs interleaved")
    assert "fits in the 1125899.91 GB available: the runs interleaved" in notes[1]


def test_engines_run_one_after_the_other_where_both_do_not_fit(model_file: Path) -> None:
    plan = BenchPlan(prompt_sizes=(8,), decode_tokens=2, repetitions=2, warmup=1)
    result, messages = bench_both_engines(model_file, plan, memory_available=10**6)
    runs = [m for m in messages if m.startswith(("pp8", "tg2", "loading"))]
    # pygemma4's process runs every round and is gone before llama.cpp's starts.
    assert runs == [
        "loading model-Q4_K_M.gguf in pygemma4 []",
        *(
            f"{test}: pygemma4 {what} ['bench-pygemma4']"
            for test in ("pp8", "tg2")
            for what in ("warm-up 1/1", "run 1/2", "run 2/2")
        ),
        "loading model-Q4_K_M.gguf in llama.cpp []",
        *(
            f"{test}: llama.cpp {what} ['bench-llamacpp']"
            for test in ("pp8", "tg2")
            for what in ("warm-up 1/1", "run 1/2", "run 2/2")
        ),
    ]
    assert [e.engine for e in result.engines] == ["pygemma4", "llamacpp"]
    assert all(e.tokens_per_s[t].runs == 2 for e in result.engines for t in ("pp8", "tg2"))
    assert result.ratio("tg2") is not None
    assert result.schedule is not None
    needed = result.schedule.footprint_bytes
    assert needed is not None
    assert result.to_json()["schedule"] == {
        "kind": "sequential",
        "footprint_bytes": needed,
        "available_bytes": 10**6,
    }
    notes = model_bench_notes(result)
    assert notes[0].endswith("; the engines ran one after the other")
    assert notes[1] == (
        f"both engines' memory, estimated at {needed / 1e6:.1f} MB (the file once, and each "
        "engine's repacked Q4_K/Q6_K matrices and KV cache), exceeds the 1.0 MB available, and "
        "interleaved runs would evict each other's pages: each engine ran all its runs and "
        "stopped before the next started (pygemma4, then llama.cpp)"
    )


def test_the_footprint_rule(model_file: Path) -> None:
    model = open_model(model_file)
    multiplied = [
        t
        for name, t in model.gguf.tensors.items()
        if len(t.shape) >= 2 and name != "per_layer_token_embd.weight"
    ]
    q4_k, q6_k = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K
    repacked = sum(t.nbytes for t in multiplied if t.type_id in (q4_k, q6_k))
    assert repacked_bytes(model) == repacked > 0
    assert {t.type_id for t in multiplied} > {q4_k, q6_k}  # other types are not counted
    spec = RunnerSpec("pygemma4", model_file, max_prompt=64, max_decode=16, max_sequences=4)
    kv = KvLayout.for_model(
        model.config, n_ctx=64, max_sequences=4, max_chunk=64, kv_dtype="f16"
    ).nbytes  # the default on the CPU
    needed = footprint_bytes(model, spec)
    assert needed == model.gguf.file_size + 2 * repacked + 2 * kv
    assert choose_schedule(model, spec, needed).kind == "interleaved"
    assert choose_schedule(model, spec, needed - 1).kind == "sequential"
    unknown = choose_schedule(model, spec, None)
    assert (unknown.kind, unknown.footprint_bytes) == ("interleaved", None)
    on_cuda = choose_schedule(model, RunnerSpec("pygemma4", model_file, backend="cuda"), 1)
    assert (on_cuda.kind, on_cuda.footprint_bytes) == ("interleaved", None)
    with open("/proc/meminfo") as meminfo:
        total = int(meminfo.readline().split()[1]) * 1024  # MemTotal
    assert 0 < memory_available_bytes() <= total


def test_the_workload_is_the_same_for_every_engine_and_seeded() -> None:
    plan = BenchPlan(prompt_sizes=(5, 9), decode_tokens=3, batches=(1, 4), seed=7)
    prompts, steps = bench_workload(plan, vocab_size=50)
    again = bench_workload(plan, vocab_size=50)
    assert prompts == again[0] and all(np.array_equal(steps[b], again[1][b]) for b in steps)
    assert {n: len(p) for n, p in prompts.items()} == {5: 5, 9: 9}
    assert all(p[0] == BOS and min(p[1:]) >= 12 and max(p) < 37 for p in prompts.values())
    assert steps[1].shape == (1, 3) and steps[4].shape == (4, 3)
    other = bench_workload(BenchPlan(prompt_sizes=(5, 9), seed=8), vocab_size=50)[0]
    assert other != prompts


def test_llama_cpp_runner_feeds_every_sequence_its_positions(model_file: Path) -> None:
    import llama_cpp

    spec = RunnerSpec("llamacpp", model_file, max_prompt=16, max_decode=5, max_sequences=3)
    runner = LlamaCppRunner(spec)
    try:
        runner.decode(np.full((3, 5), 40, dtype=np.int32))
        ends = [llama_cpp.llama_memory_seq_pos_max(runner._memory, s) for s in range(3)]
        assert ends == [5, 5, 5]  # BOS at 0, then 5 steps
        assert runner.prefill([BOS, *range(10, 25)]) > 0
        ends = [llama_cpp.llama_memory_seq_pos_max(runner._memory, s) for s in range(3)]
        assert ends == [15, -1, -1]  # cleared first, then one sequence of 16
    finally:
        runner.close()


def test_pygemma4_runner_frees_its_sequences(model_file: Path) -> None:
    spec = RunnerSpec("pygemma4", model_file, max_prompt=16, max_decode=4, max_sequences=2)
    runner = Pygemma4Runner(spec)
    engine: Engine = runner.engine
    assert runner.decode(np.full((2, 4), 40, dtype=np.int32)) > 0
    assert runner.prefill([BOS, *range(10, 25)]) > 0
    with engine.new_sequence(), engine.new_sequence():
        pass  # both slots are free again


def test_an_error_in_a_run_is_reported_and_the_runner_goes_on(model_file: Path) -> None:
    spec = RunnerSpec("pygemma4", model_file, max_prompt=8, max_decode=2)
    with IsolatedRunner(spec) as runner:
        with pytest.raises(RunnerFailedError, match="pygemma4: .*10000"):
            runner.prefill([BOS, 10000])
        assert runner.prefill([BOS, 10, 11]) > 0


def test_a_runner_whose_process_dies_is_reported(model_file: Path) -> None:
    spec = RunnerSpec("pygemma4", model_file, max_prompt=8, max_decode=2)
    with IsolatedRunner(spec) as runner:
        os.kill(runner._process.pid, signal.SIGKILL)
        with pytest.raises(RunnerFailedError, match="process died .*signal 9"):
            runner.prefill([BOS, 10, 11])


def test_llama_cpp_not_installed_is_skipped_with_the_reason(
    tmp_path: Path, model_file: Path
) -> None:
    # A package of that name which cannot be imported, ahead of the installed one: exactly
    # what Python sees where llama-cpp-python is not installed.
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named llama_cpp')\n")
    result = run_bench(
        str(model_file), "-p", "8", "-n", "2", "-r", "1", "-t", "1", "--compare", "llamacpp",
        cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join(
            [str(shadow.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        )},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "llama.cpp skipped: llama-cpp-python is not installed" in result.stdout
    assert "pygemma4 t/s" in result.stdout and "llama.cpp t/s" not in result.stdout


def test_synthetic_models_come_from_the_cache_and_say_they_are_noise(tmp_path: Path) -> None:
    # A layout-only file under the cache's name: the real E2B shapes and types, all zeros,
    # written in moments (a full one takes minutes and gigabytes).
    cached = tmp_path / "synthetic" / cache_file_name("e2b")
    cached.parent.mkdir()
    write_synthetic_model("e2b", cached, layout_only=True)
    result = run_bench(
        "--synthetic", "e2b", "-p", "2", "-n", "1", "-r", "1", "--warmup", "0", "-t", "2",
        cwd=tmp_path, env={"PYGEMMA4_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "synthetic e2b" in result.stdout and "numerics are noise" in result.stdout
    assert "3.41 GB" in result.stdout and "GB/s of weights" in result.stdout
    assert (
        "memory read bandwidth:" in result.stdout
        and "of the memory read bandwidth" in result.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "Usage: python -m pygemma4 bench [OPTIONS] COMMAND"),
        (("model",), "name a MODEL or --synthetic NAME"),
        (("MODEL", "--synthetic", "e2b"), "name a MODEL or --synthetic NAME"),
        (("MODEL", "-p", "a,b"), "'a,b' is not a comma-separated list"),
        (("MODEL", "--batch", "0"), "each number must be at least 1"),
        (("MODEL", "-p", "0", "-n", "0"), "nothing to measure"),
        (("MODEL", "-r", "0"), "0 is not in the range x>=1"),
        (("MODEL", "--compare", "vllm"), "'vllm' is not 'llamacpp'"),
    ],
)
def test_bad_options_are_usage_errors(
    tmp_path: Path, model_file: Path, args: tuple[str, ...], message: str
) -> None:
    args = tuple(str(model_file) if a == "MODEL" else a for a in args)
    result = run_bench(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.skipif(not _core.cuda_unavailable_reason(0), reason="CUDA can be used here")
def test_a_backend_that_cannot_run_here_is_a_one_line_error(
    tmp_path: Path, model_file: Path
) -> None:
    result = run_bench(str(model_file), "--backend", "cuda", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: CUDA is unavailable: ")


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    missing = run_bench(str(tmp_path / "missing.gguf"), cwd=tmp_path)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    wrong = run_bench(str(not_gguf), cwd=tmp_path)
    for result in (missing, wrong):
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_bench_tests_are_named_as_llama_bench_names_them() -> None:
    assert BenchTest("prefill", 512).name == "pp512"
    assert BenchTest("decode", 128).name == "tg128"
    assert BenchTest("decode", 128, 8).name == "tg128 x8"
    assert BenchTest("decode", 128, 8).tokens_per_run == 1024


def test_spread_and_percentiles() -> None:
    spread = Spread.of([1.0, 2.0, 3.0, 6.0])
    assert spread.mean == 3.0 and spread.runs == 4
    assert spread.std == pytest.approx(np.std([1, 2, 3, 6], ddof=1))
    assert Spread.of([5.0]).std == 0.0
    assert spread.ratio(Spread.of([1.5])) == 2.0
    with pytest.raises(ValueError):
        Spread.of([])
    values = np.random.default_rng(0).exponential(size=101).tolist()
    p = Percentiles.of(values)
    assert p is not None and p.count == 101
    assert [p.p50, p.p90, p.p99] == pytest.approx(np.percentile(values, [50, 90, 99]))
    assert Percentiles.of([]) is None


# --- bench serve -----------------------------------------------------------------------------


def test_bench_serve_starts_a_server_and_measures_a_load(
    tmp_path: Path, demo_model_file: Path
) -> None:
    out = tmp_path / "load.json"
    result = run_bench(
        "serve", str(demo_model_file), "--requests", "6", "--concurrency", "2",
        "--prompt-tokens", "8", "--output-tokens", "6", "--threads", "1", "--json", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for text in ("time to first token", "inter-token latency", "tokens/s", "0 errors"):
        assert text in result.stdout
    assert "requests" in result.stderr and "6/6" in result.stderr  # the progress bar
    document = json.loads(out.read_text())
    assert document["completed"] == 6 and document["errors"] == 0
    assert document["output_tokens"] == 36 and document["warmup_requests"] == 2
    assert document["server"]["max_batch"] == 2  # the concurrency, unless told otherwise
    assert len(document["records"]) == 6 and document["ttft_s"]["count"] == 6


def test_bench_serve_measures_a_running_server(tmp_path: Path, demo_model_file: Path) -> None:
    with started_server(demo_model_file, args=["--threads", "1", "--n-ctx", "16"]) as endpoint:
        served = run_bench(
            "serve", "--endpoint", endpoint, "--requests", "3", "--concurrency", "1",
            "--prompt-tokens", "4", "--output-tokens", "4", "--warmup", "0", cwd=tmp_path,
        )  # fmt: skip
        refused = run_bench(
            "serve", "--endpoint", endpoint, "--requests", "2", "--prompt-tokens", "32",
            "--warmup", "0", cwd=tmp_path,
        )  # fmt: skip
    assert served.returncode == 0, served.stderr
    assert "3 of 3 requests completed" in served.stdout
    assert refused.returncode == 1
    assert "2 x ServerError: context_length" in refused.stdout
    assert "error: every request failed" in refused.stderr


def test_bench_serve_refuses_options_that_cannot_apply(
    tmp_path: Path, demo_model_file: Path
) -> None:
    both = run_bench("serve", "--endpoint", "ipc:///nowhere", "--threads", "2", cwd=tmp_path)
    assert both.returncode == 2 and "--endpoint measures a running server: threads" in both.stderr
    model_and_synthetic = run_bench(
        "serve", str(demo_model_file), "--synthetic", "e2b", cwd=tmp_path
    )
    assert model_and_synthetic.returncode == 2
    assert "not both" in model_and_synthetic.stderr


def test_bench_serve_with_no_server_there_says_so(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/nobody"
    result = run_bench("serve", "--endpoint", endpoint, "--warmup", "0", cwd=tmp_path)
    assert result.returncode == 1
    assert f"error: no pygemma4 server answers at {endpoint}" in result.stderr


def test_what_a_decode_step_reads_of_each_tensor() -> None:
    assert decode_read_share("blk.0.attn_q.weight", 2, False, 0, 0) == 1.0
    assert decode_read_share("blk.0.attn_norm.weight", 1, False, 0, 0) == 0.0
    assert decode_read_share("per_layer_token_embd.weight", 2, False, 0, 0) == 0.0
    assert decode_read_share("token_embd.weight", 2, False, 0, 0) == 1.0  # the tied LM head
    assert decode_read_share("token_embd.weight", 2, True, 0, 0) == 0.0  # rows gathered
    assert decode_read_share("blk.0.ffn_gate_up_exps.weight", 3, False, 8, 128) == 1 / 16


def test_memory_read_bandwidth_rejects_bad_arguments() -> None:
    for threads, size, passes in ((0, 1 << 20, 1), (1, 1 << 20, 0), (1, 1000, 1)):
        with pytest.raises(ValueError, match="memory_read_bandwidth needs"):
            _core.memory_read_bandwidth(threads, size, passes)
