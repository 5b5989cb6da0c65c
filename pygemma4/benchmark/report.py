"""The benchmark figures for people (rich tables) and for programs (JSON files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from pygemma4.benchmark.draft_bench import PUBLISHED_ACCEPTANCE, DraftBenchResult
from pygemma4.benchmark.load import LoadResult
from pygemma4.benchmark.model_bench import BenchResult
from pygemma4.benchmark.runners import ENGINE_TITLES
from pygemma4.benchmark.schedule import SEQUENTIAL, Schedule
from pygemma4.benchmark.stats import Percentiles, Spread

SYNTHETIC_NOTICE = (
    "synthetic {name}: the real model's tensor shapes and Q4_K_M types with random weights; "
    "its numerics are noise, only its speed means anything"
)


def write_json(path: str | os.PathLike[str], document: dict[str, Any]) -> None:
    """Write `document` to `path` as indented JSON."""
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _spread(s: Spread, digits: int = 2) -> str:
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _ratio(r: float | None) -> str:
    return "" if r is None else f"{r:.2f}x"


def model_bench_table(result: BenchResult) -> Table:
    """One row per test (and load time, peak memory), one column per engine, and the ratio
    of pygemma4 to llama.cpp where both ran."""
    model = result.model
    where = "CPU" if result.backend == "cpu" else f"CUDA device {result.device}"
    title = (
        f"{model.name} {model.file_type} · {_bytes(model.file_bytes)} · "
        f"{_count(model.parameters)} params · {where} · {result.threads} threads · "
        f"KV {result.kv_dtype}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("test", no_wrap=True)
    for engine in result.engines:
        table.add_column(f"{engine.title} t/s", justify="right", no_wrap=True)
    compared = len(result.engines) > 1
    if compared:
        table.add_column(" / ".join(e.title for e in result.engines), justify="right")
    for test in result.plan.tests:
        table.add_row(
            test.name,
            *(_spread(e.tokens_per_s[test.name]) for e in result.engines),
            *([_ratio(result.ratio(test.name))] if compared else []),
        )
    table.add_section()
    loads = [e.load_s for e in result.engines]
    peaks = [e.peak_rss_bytes for e in result.engines]
    table.add_row(
        "load (s)",
        *(f"{s:.2f}" for s in loads),
        *([_ratio(loads[0] / loads[1])] if compared else []),
    )
    table.add_row(
        "peak memory (RSS)",
        *(_bytes(p) for p in peaks),
        *([_ratio(peaks[0] / peaks[1])] if compared else []),
    )
    return table


def model_bench_notes(result: BenchResult) -> list[str]:
    """The lines under the table: how the figures were taken, the weight bandwidth of
    decode, what was skipped and why."""
    plan = result.plan
    notes = []
    if result.model.synthetic:
        notes.append(SYNTHETIC_NOTICE.format(name=result.model.synthetic))
    schedule = result.schedule if len(result.engines) > 1 else None
    order = ""
    if schedule is not None:
        sequential = schedule.kind == SEQUENTIAL
        order = (
            "; the engines ran one after the other"
            if sequential
            else "; the engines' runs interleaved"
        )
    notes.append(
        f"tokens/s: mean ± standard deviation over {plan.repetitions} runs after "
        f"{plan.warmup} warm-up run(s); every engine fed the same token ids (seed {plan.seed})"
        + order
    )
    if schedule is not None:
        notes += _schedule_notes(schedule, result)
    if result.memory_read_bytes_per_s is not None:
        notes.append(
            f"memory read bandwidth: {result.memory_read_bytes_per_s / 1e9:.1f} GB/s "
            f"({result.threads} threads streaming 1 GiB, best of 5, before the engines started)"
        )
    for engine in result.engines:
        for test in plan.tests:
            if test.kind == "decode":
                share = result.memory_bandwidth_share(engine, test)
                notes.append(
                    f"{engine.title} {test.name}: "
                    f"{result.weight_bytes_per_s(engine, test) / 1e9:.1f} GB/s of weights "
                    f"({_bytes(result.model.decode_bytes)} read per step)"
                    + (f" = {share:.0%} of the memory read bandwidth" if share is not None else "")
                )
    for engine, reason in result.skipped.items():
        notes.append(f"{ENGINE_TITLES[engine]} skipped: {reason}")
    return notes


def _schedule_notes(schedule: Schedule, result: BenchResult) -> list[str]:
    """Why the engines' runs interleaved or ran one engine after the other."""
    needed, available = schedule.footprint_bytes, schedule.available_bytes
    if needed is None or available is None:
        if result.backend == "cpu":
            return ["the memory available is unknown (no MemAvailable): the runs interleaved"]
        return []  # on CUDA the weights live in device memory
    estimate = (
        f"both engines' memory, estimated at {_bytes(needed)} (the file once, and each "
        "engine's repacked Q4_K/Q6_K matrices and KV cache)"
    )
    if schedule.kind != SEQUENTIAL:
        return [f"{estimate}, fits in the {_bytes(available)} available: the runs interleaved"]
    order = ", then ".join(engine.title for engine in result.engines)
    return [
        f"{estimate}, exceeds the {_bytes(available)} available, and interleaved runs would "
        f"evict each other's pages: each engine ran all its runs and stopped before the next "
        f"started ({order})"
    ]


def print_model_bench(result: BenchResult, console: Console) -> None:
    """The table and its notes."""
    console.print(model_bench_table(result))
    for note in model_bench_notes(result):
        console.print(note, style="dim", highlight=False)


def _percentiles_ms(p: Percentiles | None) -> tuple[str, str, str]:
    """p50, p90, p99 in milliseconds (dashes where nothing was measured)."""
    if p is None:
        return ("-", "-", "-")
    return (f"{p.p50 * 1e3:.1f}", f"{p.p90 * 1e3:.1f}", f"{p.p99 * 1e3:.1f}")


def print_load(result: LoadResult, warmup: int, console: Console) -> None:
    """The figures of a load on a server: throughput, latency percentiles, errors."""
    spec, server = result.spec, result.server
    title = (
        f"{Path(server.model).name} served · {spec.requests} requests, {spec.concurrency} at "
        f"a time · prompt {spec.prompt_tokens} tokens, output {spec.output_tokens} tokens"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("figure", no_wrap=True)
    for name in ("p50", "p90", "p99"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row("time to first token (ms)", *_percentiles_ms(result.ttft))
    table.add_row("inter-token latency (ms)", *_percentiles_ms(result.itl))
    table.add_row("request latency (ms)", *_percentiles_ms(result.latency))
    console.print(table)
    console.print(
        f"output {result.output_tokens_per_s:.1f} tokens/s · {result.requests_per_s:.2f} "
        f"requests/s · {result.completed} of {len(result.records)} requests completed in "
        f"{result.wall_s:.2f} s · {result.errors} errors",
        highlight=False,
    )
    console.print(
        f"after {warmup} unmeasured warm-up requests; times taken at the client, from sending "
        "a request to each streamed chunk (a chunk of k tokens counts as k tokens evenly apart)",
        style="dim",
        highlight=False,
    )
    if spec.shared_prefix_tokens:
        console.print(_prefix_reuse_line(result), highlight=False)
    for message, count in result.error_messages.items():
        console.print(f"{count} x {message}", style="red", highlight=False)


def _prefix_reuse_line(result: LoadResult) -> str:
    """The first request's time to first token (it computed the shared prefix) against the
    others' (which could take it from the prefix cache)."""
    first, *rest = sorted(result.records, key=lambda r: r.index)
    later = [r.ttft_s for r in rest if r.ttft_s is not None]
    if first.ttft_s is None or not later:
        return "shared prefix: too few requests got a first token to compare"
    median = float(np.median(later))
    return (
        f"shared prefix of {result.spec.shared_prefix_tokens} tokens: time to first token "
        f"{first.ttft_s * 1e3:.0f} ms for the first request, {median * 1e3:.0f} ms (median) for "
        f"the {len(later)} after it: {first.ttft_s / median:.1f}x shorter"
    )


def print_draft_bench(result: DraftBenchResult, console: Console) -> None:
    """The drafting benchmark: speed with and without drafting, acceptance per position, the
    cost of verifying k tokens, and the modelled speed at the published acceptance rates."""
    speculation = result.speculation
    title = (
        f"{result.model} · drafting {result.draft_tokens} tokens with {result.draft} · "
        f"{result.threads} threads · {result.generated_tokens} tokens after a "
        f"{result.prompt_tokens}-token prompt, median of {result.repetitions}"
    )
    speeds = Table(title=title, title_justify="left")
    speeds.add_column("decode", no_wrap=True)
    speeds.add_column("tokens/s", justify="right")
    speeds.add_column("vs plain", justify="right")
    speeds.add_row("plain", f"{result.plain_tokens_per_s:.2f}", "")
    speeds.add_row(
        "drafting",
        f"{result.drafted_tokens_per_s:.2f}",
        _ratio(result.drafted_tokens_per_s / result.plain_tokens_per_s),
    )
    console.print(speeds)
    acceptance = Table(title="acceptance per draft position (measured)", title_justify="left")
    for position in range(len(speculation.proposed_at)):
        acceptance.add_column(str(position + 1), justify="right")
    acceptance.add_row(*(f"{a:.2f}" for a in speculation.acceptance_per_position()))
    console.print(acceptance)
    costs = Table(title="one call appending n tokens (measured)", title_justify="left")
    costs.add_column("n", justify="right")
    costs.add_column("ms", justify="right")
    costs.add_column("vs 1 token", justify="right")
    for cost in result.verification.values():
        costs.add_row(str(cost.tokens), f"{cost.seconds * 1e3:.1f}", _ratio(cost.ratio))
    console.print(costs)
    published = ", ".join(f"{a:.2f}" for a in PUBLISHED_ACCEPTANCE)
    modelled = Table(
        title=f"MODEL: the speed the measured costs give at the published acceptance "
        f"({published} per position)",
        title_justify="left",
    )
    for column in ("k", "tokens per step", "step cost (plain steps)", "tokens/s", "vs plain"):
        modelled.add_column(column, justify="right")
    for speed in result.modelled():
        modelled.add_row(
            str(speed.k),
            f"{speed.tokens_per_step:.2f}",
            f"{speed.step_cost:.2f}",
            f"{speed.tokens_per_s:.2f}",
            _ratio(speed.tokens_per_s / result.plain_tokens_per_s),
        )
    console.print(modelled)
    notes = [
        f"drafted output {'identical to' if result.identical else 'DIFFERENT from'} plain "
        "greedy output",
        f"drafting costs {result.draft_cost:.2f} plain decode steps per verification step "
        f"({speculation.accepted}/{speculation.proposed} drafts kept)",
    ]
    for note in notes:
        console.print(f"  {note}")
