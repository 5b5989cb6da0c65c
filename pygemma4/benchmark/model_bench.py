"""The llama-bench-style measurement: prefill and decode speed of one or more engines on one
GGUF, their load times and peak memory.

Every engine gets exactly the same token ids (drawn once from a seeded generator), runs each
test `warmup` times unmeasured, then `repetitions` measured times. The engines' runs alternate,
so a change in the machine's state (another process, the clock) falls on both, unless both
engines' memory does not fit in the machine together: then one engine runs after the other
(`schedule`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pygemma4 import _core
from pygemma4.benchmark.isolation import IsolatedRunner
from pygemma4.benchmark.runners import ENGINE_TITLES, RunnerSpec, RunnerUnavailableError
from pygemma4.benchmark.schedule import Schedule, choose_schedule
from pygemma4.benchmark.stats import Spread
from pygemma4.benchmark.tokens import BOS, random_ids
from pygemma4.config import ModelFile, open_model
from pygemma4.kv import resolve_kv_dtype
from pygemma4.memory import memory_available_bytes
from pygemma4.model_info import decode_read_bytes
from pygemma4.runner import check_backend


@dataclass(frozen=True)
class BenchTest:
    """One measured figure: a prefill of `tokens` prompt tokens, or `tokens` decode steps of
    `sequences` sequences at once."""

    kind: str  # "prefill" or "decode"
    tokens: int
    sequences: int = 1

    @property
    def name(self) -> str:
        """llama-bench's names: pp512 for a 512-token prefill, tg128 for 128 decoded tokens
        (tg128 x8: of 8 sequences at once)."""
        if self.kind == "prefill":
            return f"pp{self.tokens}"
        return f"tg{self.tokens}" + (f" x{self.sequences}" if self.sequences > 1 else "")

    @property
    def tokens_per_run(self) -> int:
        """Tokens one run computes, all sequences together."""
        return self.tokens * self.sequences


@dataclass(frozen=True)
class BenchPlan:
    """What to measure: prefills of each of `prompt_sizes` tokens, `decode_tokens` decode steps
    for each of `batches` sequence counts (0 in either leaves those tests out)."""

    prompt_sizes: tuple[int, ...] = (512,)
    decode_tokens: int = 128
    batches: tuple[int, ...] = (1,)
    repetitions: int = 5
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name, values in (("prompt size", self.prompt_sizes), ("batch", self.batches)):
            if not values or any(v < 0 for v in values):
                raise ValueError(f"each {name} must be 0 or more, not {list(values)}")
        if any(b == 0 for b in self.batches):
            raise ValueError(f"each batch must be at least 1, not {list(self.batches)}")
        if self.decode_tokens < 0:
            raise ValueError(f"decode tokens must be 0 or more, not {self.decode_tokens}")
        if self.repetitions < 1:
            raise ValueError(f"repetitions must be at least 1, not {self.repetitions}")
        if self.warmup < 0:
            raise ValueError(f"warm-up runs must be 0 or more, not {self.warmup}")
        if not self.tests:
            raise ValueError("nothing to measure: every prompt size and the decode count are 0")

    @property
    def tests(self) -> tuple[BenchTest, ...]:
        prefills = [BenchTest("prefill", n) for n in self.prompt_sizes if n > 0]
        decodes = [BenchTest("decode", self.decode_tokens, b) for b in self.batches]
        return tuple(prefills + (decodes if self.decode_tokens > 0 else []))

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_sizes": list(self.prompt_sizes),
            "decode_tokens": self.decode_tokens,
            "batches": list(self.batches),
            "repetitions": self.repetitions,
            "warmup": self.warmup,
            "seed": self.seed,
        }


@dataclass
class EngineResult:
    """One engine's figures: tokens/s per test name, load seconds, peak resident memory."""

    engine: str
    load_s: float
    peak_rss_bytes: int
    tokens_per_s: dict[str, Spread] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return ENGINE_TITLES[self.engine]

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "load_s": self.load_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "tokens_per_s": {name: s.to_json() for name, s in self.tokens_per_s.items()},
        }


@dataclass(frozen=True)
class ModelSummary:
    """The measured file: its size, parameters, type mix and the weight bytes a decode step
    of one sequence reads."""

    path: Path
    name: str
    file_bytes: int
    parameters: int
    file_type: str
    decode_bytes: int
    vocab_size: int
    synthetic: str | None = None  # the synthetic model's name: random weights

    @classmethod
    def of(cls, model: ModelFile, synthetic: str | None = None) -> ModelSummary:
        from gguf import LlamaFileType

        gguf = model.gguf
        path = gguf.path
        file_type = gguf.metadata.get("general.file_type")
        try:
            type_label = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            type_label = f"file type {file_type}"
        return cls(
            path=path,
            name=str(gguf.metadata.get("general.name") or path.stem),
            file_bytes=gguf.file_size,
            parameters=sum(int(np.prod(t.shape)) for t in gguf.tensors.values()),
            file_type=type_label,
            decode_bytes=decode_read_bytes(model),
            vocab_size=model.config.vocab_size,
            synthetic=synthetic,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "name": self.name,
            "file_bytes": self.file_bytes,
            "parameters": self.parameters,
            "file_type": self.file_type,
            "decode_bytes": self.decode_bytes,
            "vocab_size": self.vocab_size,
            "synthetic": self.synthetic,
        }


@dataclass
class BenchResult:
    """Everything one `pygemma4 bench` run measured, and on what."""

    model: ModelSummary
    plan: BenchPlan
    backend: str
    device: int
    threads: int
    engines: list[EngineResult]
    skipped: dict[str, str]  # engine -> why it did not run
    started: str
    machine: dict[str, Any]
    # Bytes/s that the run's threads read from memory, measured before the engines started
    # (CPU backend only): the ceiling of a decode step, which reads every weight once.
    memory_read_bytes_per_s: float | None = None
    # How the runs of two or more engines were ordered (None for one engine).
    schedule: Schedule | None = None
    kv_dtype: str = "f16"  # the KV cache's entries, in every engine

    def ratio(self, test: str, engine: str = "pygemma4", other: str = "llamacpp") -> float | None:
        """`engine`'s tokens/s over `other`'s in test `test`, where both ran it."""
        by_engine = {e.engine: e.tokens_per_s for e in self.engines}
        if engine not in by_engine or other not in by_engine:
            return None
        return by_engine[engine][test].ratio(by_engine[other][test])

    def weight_bytes_per_s(self, engine: EngineResult, test: BenchTest) -> float:
        """Bytes of weights per second that `engine`'s decode `test` read: a step reads the
        model's decode_bytes whatever the number of sequences."""
        steps_per_s = engine.tokens_per_s[test.name].mean / test.sequences
        return steps_per_s * self.model.decode_bytes

    def memory_bandwidth_share(self, engine: EngineResult, test: BenchTest) -> float | None:
        """The weight bandwidth of `engine`'s decode `test` over the measured memory read
        bandwidth (CPU only)."""
        if self.memory_read_bytes_per_s is None:
            return None
        return self.weight_bytes_per_s(engine, test) / self.memory_read_bytes_per_s

    def to_json(self) -> dict[str, Any]:
        tests = [t.name for t in self.plan.tests]
        return {
            "started": self.started,
            "machine": self.machine,
            "model": self.model.to_json(),
            "backend": self.backend,
            "device": self.device,
            "threads": self.threads,
            "kv_dtype": self.kv_dtype,
            "plan": self.plan.to_json(),
            "engines": [e.to_json() for e in self.engines],
            "skipped": self.skipped,
            "ratios": {t: r for t in tests if (r := self.ratio(t)) is not None},
            "decode_weight_bytes_per_s": {
                e.engine: {
                    t.name: self.weight_bytes_per_s(e, t)
                    for t in self.plan.tests
                    if t.kind == "decode"
                }
                for e in self.engines
            },
            "memory_read_bytes_per_s": self.memory_read_bytes_per_s,
            "schedule": None if self.schedule is None else self.schedule.to_json(),
        }


Progress = Callable[[str], None]


def bench_model(
    model: Path,
    plan: BenchPlan,
    engines: Sequence[str] = ("pygemma4",),
    *,
    backend: str = "cpu",
    device: int = 0,
    threads: int = 1,
    synthetic: str | None = None,
    progress: Progress | None = None,
    memory_available: int | None = None,
    kv_dtype: str | None = None,
) -> BenchResult:
    """Measure `plan` with each engine on `model`. An engine other than pygemma4 that cannot
    run here (not installed) is skipped with the reason in `skipped`; a backend that cannot
    run here, or an error in a run, raises.

    With two or more engines, `memory_available` (bytes; default: MemAvailable now) decides
    whether their runs interleave (see `schedule`). Both engines store KV entries as
    `kv_dtype` (default: pygemma4's for the backend).
    """
    kv_dtype = resolve_kv_dtype(kv_dtype, backend)
    check_backend(backend, device)  # here, before any engine's process starts
    report = progress or (lambda _: None)
    memory_read = None
    if backend == "cpu":
        report(f"measuring memory read bandwidth ({threads} threads)")
        memory_read = _core.memory_read_bandwidth(threads)
    model_file = open_model(model)
    summary = ModelSummary.of(model_file, synthetic)
    tests = plan.tests
    spec = RunnerSpec(
        "pygemma4",
        model,
        backend=backend,
        device=device,
        threads=threads,
        max_prompt=max((t.tokens for t in tests if t.kind == "prefill"), default=1),
        max_decode=max((t.tokens for t in tests if t.kind == "decode"), default=1),
        max_sequences=max(t.sequences for t in tests),
        kv_dtype=kv_dtype,
    )
    schedule = None
    if len(engines) > 1:
        available = memory_available_bytes() if memory_available is None else memory_available
        schedule = choose_schedule(model_file, spec, available)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    workload = bench_workload(plan, summary.vocab_size)
    results: list[EngineResult] = []
    skipped: dict[str, str] = {}
    for phase in schedule.phases(engines) if schedule else [tuple(engines)]:
        runners: dict[str, IsolatedRunner] = {}
        try:
            for engine in phase:
                report(f"loading {model.name} in {ENGINE_TITLES[engine]}")
                try:
                    runners[engine] = IsolatedRunner(dataclasses.replace(spec, engine=engine))
                except RunnerUnavailableError as e:
                    if engine == "pygemma4":
                        raise
                    skipped[engine] = str(e)
            results += _measure(runners, plan, workload, report)
        finally:
            for runner in runners.values():
                runner.close()
    return BenchResult(
        model=summary,
        plan=plan,
        backend=backend,
        device=device,
        threads=threads,
        engines=results,
        skipped=skipped,
        started=started,
        machine=machine_description(),
        memory_read_bytes_per_s=memory_read,
        schedule=schedule,
        kv_dtype=kv_dtype,
    )


Workload = tuple[dict[int, list[int]], dict[int, np.ndarray]]


def _measure(
    runners: dict[str, IsolatedRunner], plan: BenchPlan, workload: Workload, report: Progress
) -> list[EngineResult]:
    """Every test of `plan` on each of `runners`: the rounds of one test in turn, and within a
    round the runners in turn."""
    prompts, decode_steps = workload
    seconds: dict[str, dict[str, list[float]]] = {e: {} for e in runners}
    for test in plan.tests:
        for round_index in range(plan.warmup + plan.repetitions):
            measured = round_index >= plan.warmup
            what = (
                f"run {round_index - plan.warmup + 1}/{plan.repetitions}"
                if measured
                else f"warm-up {round_index + 1}/{plan.warmup}"
            )
            for engine, runner in runners.items():
                report(f"{test.name}: {runner.title} {what}")
                if test.kind == "prefill":
                    taken = runner.prefill(prompts[test.tokens])
                else:
                    taken = runner.decode(decode_steps[test.sequences])
                if measured:
                    seconds[engine].setdefault(test.name, []).append(taken)
    return [
        EngineResult(
            engine,
            runner.load_s,
            runner.peak_rss_bytes,
            {
                test.name: Spread.of([test.tokens_per_run / s for s in seconds[engine][test.name]])
                for test in plan.tests
            },
        )
        for engine, runner in runners.items()
    ]


def bench_workload(plan: BenchPlan, vocab_size: int) -> Workload:
    """The token ids every engine is fed: a prompt per prefill size (BOS, then random ids)
    and decode steps [sequences, decode_tokens] per batch, from one seeded generator."""
    rng = np.random.default_rng(plan.seed)
    prompts = {
        n: [BOS, *random_ids(rng, vocab_size, n - 1).tolist()] for n in plan.prompt_sizes if n > 0
    }
    steps = {b: random_ids(rng, vocab_size, (b, plan.decode_tokens)) for b in plan.batches}
    return prompts, steps


def machine_description() -> dict[str, Any]:
    """The machine the figures come from: CPU model, cores available, system, Python, and the
    versions of pygemma4 and of llama-cpp-python (where installed)."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass  # not Linux, or no model name: the platform's word for it stays
    versions = {}
    for package in ("pygemma4", "llama_cpp_python"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        "system": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }
