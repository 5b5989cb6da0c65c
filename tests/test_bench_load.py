"""The load generator of `pygemma4 bench serve` and its server launcher, against the real
`pygemma4 serve` on the demo model.

What they must do: run every request of a load with at most `concurrency` in flight, record
each one's tokens and timings (time to first token, one inter-token latency per token after
the first) and summarize them consistently; count requests the server refuses as errors with
the server's reason and finish the load; fail fast, naming the problem, where no server
answers or where a server does not start; and never leave a server process or its endpoint
directory behind.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pygemma4.benchmark.load import (
    LoadResult,
    LoadSpec,
    NoServerError,
    RequestRecord,
    make_prompts,
    run_load,
    token_latencies,
)
from pygemma4.benchmark.server_process import ServerStartError, started_server
from pygemma4.benchmark.tokens import BOS, prompt_id_range
from pygemma4.errors import Gemma4Error

N_CTX = 64
SERVER_ARGS = ["--threads", "1", "--max-batch", "4", "--n-ctx", str(N_CTX)]
MAIN_SPEC = LoadSpec(requests=8, concurrency=3, prompt_tokens=16, output_tokens=12)


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(demo_model_file: Path) -> Iterator[str]:
    """One server for the module: the demo model, named by the cache directory it is in (as
    `pygemma4 bench serve` without a model starts it), with a context of N_CTX tokens."""
    env = {"PYGEMMA4_CACHE": str(demo_model_file.parent)}
    with started_server(None, args=SERVER_ARGS, env=env, start_timeout=120) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def main_load(endpoint: str) -> tuple[LoadResult, list[RequestRecord]]:
    """MAIN_SPEC run once, with the records on_request_done was given."""
    done: list[RequestRecord] = []
    return run_load(endpoint, MAIN_SPEC, done.append), done


def peak_in_flight(records: tuple[RequestRecord, ...]) -> int:
    """The most requests in flight at once, from when each was sent and ended (one that ends
    at the instant another is sent does not overlap it)."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    in_flight = peak = 0
    for _, change in events:
        in_flight += change
        peak = max(peak, in_flight)
    return peak


def processes_mentioning(text: str) -> list[int]:
    """The ids of the processes whose command line contains `text` (a server names its
    endpoint there, and its workers their configuration, endpoint included)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # it ended meanwhile
    return pids


def wait_until_gone(text: str, timeout: float = 10.0) -> list[int]:
    """The processes still mentioning `text` after waiting up to `timeout` s for none to."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where `started_server` makes its endpoint directories during the test."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


# --- the spec, the prompts and the arithmetic ------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"requests": 0}, "requests"),
        ({"concurrency": -1}, "concurrency"),
        ({"prompt_tokens": 0}, "prompt_tokens"),
        ({"output_tokens": 2.5}, "output_tokens"),
        ({"requests": True}, "requests"),
        ({"seed": -1}, "seed"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
    ],
)
def test_load_spec_refuses_bad_values(changes: dict[str, object], field: str) -> None:
    values: dict[str, object] = {
        "requests": 1,
        "concurrency": 1,
        "prompt_tokens": 1,
        "output_tokens": 1,
        **changes,
    }
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        LoadSpec(**values)  # type: ignore[arg-type]


def test_prompts_are_bos_then_ordinary_ids_the_same_for_a_seed() -> None:
    spec = LoadSpec(requests=5, concurrency=2, prompt_tokens=20, output_tokens=4, seed=7)
    prompts = make_prompts(spec, vocab_size=1000)
    low, high = prompt_id_range(1000)
    assert 0 < low < high <= 1000 and low > BOS
    assert len(prompts) == 5
    for prompt in prompts:
        assert len(prompt) == 20 and prompt[0] == BOS
        assert all(low <= t < high and isinstance(t, int) for t in prompt[1:])
    assert len({tuple(p) for p in prompts}) == 5  # each request a prompt of its own
    assert make_prompts(spec, 1000) == prompts
    other_seed = LoadSpec(requests=5, concurrency=2, prompt_tokens=20, output_tokens=4, seed=8)
    assert make_prompts(other_seed, 1000) != prompts
    one_token = LoadSpec(requests=2, concurrency=1, prompt_tokens=1, output_tokens=1)
    assert make_prompts(one_token, 1000) == [[BOS], [BOS]]
    for vocab_size in (1, 2, 3, 5):
        low, high = prompt_id_range(vocab_size)
        assert 0 <= low < high <= vocab_size


def test_token_latencies_split_a_chunk_gap_over_its_tokens() -> None:
    # Sent at 10; tokens at 10.5 (2 of them), a chunk without tokens, 3 tokens at 11.1,
    # 1 token at 11.2.
    arrivals = [(10.5, 2), (10.8, 0), (11.1, 3), (11.2, 1)]
    ttft, itl = token_latencies(10.0, arrivals)
    assert ttft == pytest.approx(0.5)
    assert itl == pytest.approx([0.2, 0.2, 0.2, 0.1])
    assert token_latencies(10.0, [(10.3, 0)]) == (None, ())
    assert token_latencies(10.0, []) == (None, ())


# --- a load on the real server ---------------------------------------------------------------


def test_every_request_gets_its_tokens_and_timings(
    main_load: tuple[LoadResult, list[RequestRecord]],
) -> None:
    result, _ = main_load
    spec = MAIN_SPEC
    assert result.spec == spec
    assert [r.index for r in result.records] == list(range(spec.requests))
    for record in result.records:
        assert record.ok and record.error is None, record.error
        assert record.output_tokens == spec.output_tokens
        assert record.ttft_s is not None and record.ttft_s > 0
        assert len(record.itl_s) == spec.output_tokens - 1
        assert all(gap >= 0 for gap in record.itl_s)
        # The first token, then the gaps, then at most the end reply: the request's latency.
        assert record.ttft_s + sum(record.itl_s) <= record.latency_s + 1e-9
        assert record.latency_s == pytest.approx(record.end_s - record.start_s)
        assert 0 <= record.start_s < record.end_s


def test_summaries_agree_with_the_records(
    main_load: tuple[LoadResult, list[RequestRecord]],
) -> None:
    result, _ = main_load
    records = result.records
    assert (result.completed, result.errors, result.error_messages) == (8, 0, {})
    assert result.wall_s == pytest.approx(
        max(r.end_s for r in records) - min(r.start_s for r in records)
    )
    assert result.output_tokens == 8 * 12
    assert result.output_tokens_per_s == pytest.approx(8 * 12 / result.wall_s)
    assert result.requests_per_s == pytest.approx(8 / result.wall_s)
    assert result.mean_latency_s == pytest.approx(sum(r.latency_s for r in records) / 8)
    for percentiles, count, values in [
        (result.ttft, 8, [r.ttft_s for r in records]),
        (result.itl, 8 * 11, [gap for r in records for gap in r.itl_s]),
        (result.latency, 8, [r.latency_s for r in records]),
    ]:
        assert percentiles is not None and percentiles.count == count
        assert min(values) <= percentiles.p50 <= percentiles.p90 <= percentiles.p99
        assert percentiles.p99 <= max(values)
    assert result.server.n_ctx == N_CTX and result.server.max_batch == 4


def test_json_holds_the_summaries_and_round_trips(
    main_load: tuple[LoadResult, list[RequestRecord]],
) -> None:
    result, _ = main_load
    summary = result.to_json()
    assert "records" not in summary
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["spec"] == {
        "requests": 8,
        "concurrency": 3,
        "prompt_tokens": 16,
        "output_tokens": 12,
        "seed": 0,
        "timeout": 600.0,
        "shared_prefix_tokens": 0,
    }
    assert summary["completed"] == 8 and summary["errors"] == 0
    assert summary["output_tokens_per_s"] == result.output_tokens_per_s
    assert summary["ttft_s"] == result.ttft.to_json()  # type: ignore[union-attr]
    assert summary["itl_s"]["count"] == 88
    assert summary["server"]["model"] == "pygemma4-demo-v1.gguf"
    full = result.to_json(records=True)
    assert json.loads(json.dumps(full, allow_nan=False)) == full
    assert len(full["records"]) == 8 and len(full["records"][0]["itl_s"]) == 11


def test_concurrency_is_used_and_never_exceeded(
    endpoint: str, main_load: tuple[LoadResult, list[RequestRecord]]
) -> None:
    result, _ = main_load
    assert peak_in_flight(result.records) == MAIN_SPEC.concurrency
    one_at_a_time = run_load(endpoint, LoadSpec(3, 1, 8, 4))
    assert peak_in_flight(one_at_a_time.records) == 1
    ordered = sorted(one_at_a_time.records, key=lambda r: r.start_s)
    assert all(a.end_s <= b.start_s for a, b in zip(ordered, ordered[1:], strict=False))
    more_workers_than_requests = run_load(endpoint, LoadSpec(2, 5, 8, 4))
    assert len(more_workers_than_requests.records) == 2
    assert more_workers_than_requests.completed == 2


def test_on_request_done_gets_each_record_once(
    main_load: tuple[LoadResult, list[RequestRecord]],
) -> None:
    result, done = main_load
    assert len(done) == MAIN_SPEC.requests
    assert sorted(done, key=lambda r: r.index) == list(result.records)
    # Called as each request ends, not all at the end in request order.
    assert [r.end_s for r in done] == sorted(r.end_s for r in done)


@pytest.mark.parametrize(
    ("prompt_tokens", "output_tokens", "reason"),
    [
        (N_CTX + 16, 4, f"longer than the context of {N_CTX} tokens"),
        (40, 40, f"exceeds the context of {N_CTX} tokens"),
    ],
)
def test_refused_requests_are_errors_and_the_load_finishes(
    endpoint: str, prompt_tokens: int, output_tokens: int, reason: str
) -> None:
    done: list[RequestRecord] = []
    spec = LoadSpec(5, 2, prompt_tokens, output_tokens)
    result = run_load(endpoint, spec, done.append)
    assert (result.completed, result.errors, len(done)) == (0, 5, 5)
    [(message, count)] = result.error_messages.items()
    assert count == 5
    assert message.startswith("ServerError: context_length: ") and reason in message
    for record in result.records:
        assert not record.ok and record.error == message
        assert record.output_tokens == 0 and record.ttft_s is None and record.itl_s == ()
    assert result.ttft is None and result.itl is None and result.latency is None
    assert result.output_tokens_per_s == 0 and result.requests_per_s == 0
    summary = result.to_json(records=True)
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["error_messages"] == {message: 5} and summary["ttft_s"] is None
    # The server is none the worse: a load that fits still runs.
    assert run_load(endpoint, LoadSpec(2, 2, 8, 4)).completed == 2


def test_no_server_fails_fast_naming_the_endpoint(tmp_path: Path) -> None:
    nowhere = f"ipc://{tmp_path}/nothing-listens"
    start = time.monotonic()
    with pytest.raises(NoServerError, match=f"no pygemma4 server answers at {nowhere} within 1 s"):
        run_load(nowhere, LoadSpec(1, 1, 1, 1), info_timeout=1)
    assert time.monotonic() - start < 5
    assert issubclass(NoServerError, Gemma4Error)


# --- the server launcher ---------------------------------------------------------------------


def test_a_missing_model_fails_to_start_with_the_servers_message(private_tempdir: Path) -> None:
    missing = private_tempdir / "missing.gguf"
    start = time.monotonic()
    with pytest.raises(ServerStartError) as raised, started_server(missing, start_timeout=60):
        pytest.fail("the server started on a missing model")
    assert time.monotonic() - start < 30
    message = str(raised.value)
    assert message.startswith("the server exited with status 1 before serving: ")
    assert f"error: {missing}: no such file" in message
    assert isinstance(raised.value, Gemma4Error)
    assert list(private_tempdir.iterdir()) == []  # its endpoint directory is gone


def test_a_server_not_serving_in_time_is_stopped(
    demo_model_file: Path, private_tempdir: Path
) -> None:
    start = time.monotonic()
    with (
        pytest.raises(ServerStartError, match=r"^the server was not serving within 0\.05 s: "),
        started_server(demo_model_file, args=SERVER_ARGS, start_timeout=0.05),
    ):
        pytest.fail("the server was ready at once")
    assert time.monotonic() - start < 30
    assert wait_until_gone(str(private_tempdir)) == []
    assert list(private_tempdir.iterdir()) == []


def test_the_server_and_its_endpoint_go_when_the_block_ends(
    demo_model_file: Path, private_tempdir: Path
) -> None:
    with started_server(demo_model_file, args=SERVER_ARGS) as endpoint:
        assert endpoint.startswith(f"ipc://{private_tempdir}/")
        socket_file = Path(endpoint.removeprefix("ipc://"))
        assert socket_file.exists()
        # The server and its workers (whose configuration names the endpoint).
        assert len(processes_mentioning(endpoint)) >= 2
        assert run_load(endpoint, LoadSpec(1, 1, 4, 2)).completed == 1
    assert wait_until_gone(endpoint) == []
    assert list(private_tempdir.iterdir()) == []
