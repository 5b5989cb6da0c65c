"""A runner in a process of its own.

Two engines measured in one process would share one peak-memory figure and each other's
allocator and thread state; each here gets a fresh interpreter, so its load time and peak
resident memory are its own, while the parent still interleaves their runs. The child times
every call itself, so the pipe between them never enters a figure.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pygemma4.benchmark.runners import (
    ENGINE_TITLES,
    RunnerSpec,
    RunnerUnavailableError,
    close_runner,
    import_engine,
    load_runner,
)
from pygemma4.errors import Gemma4Error

POLL_S = 0.2
STOP_TIMEOUT_S = 10.0


class RunnerFailedError(Gemma4Error, RuntimeError):
    """A runner's process failed: an error inside the engine, or the process died."""


@dataclass(frozen=True)
class Prefill:
    """Time one prefill of these prompt tokens."""

    tokens: list[int]


@dataclass(frozen=True)
class Decode:
    """Time decode steps: row i of `steps` is fed to sequence i, one column per step."""

    steps: np.ndarray


@dataclass(frozen=True)
class Measured:
    """A reply: seconds taken (the load's, or the call's), and the process's peak resident
    memory so far."""

    seconds: float
    peak_rss_bytes: int


@dataclass(frozen=True)
class Failed:
    """A reply: the call raised; `unavailable` where the engine cannot run here at all."""

    message: str
    unavailable: bool


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _serve(spec: RunnerSpec, connection: Connection) -> None:
    """The child: load the runner, report the load, then answer calls until told to stop."""
    try:
        try:
            import_engine(spec.engine)
            start = time.perf_counter()
            runner = load_runner(spec)
        except (Gemma4Error, ValueError, OSError) as e:
            connection.send(Failed(str(e), isinstance(e, RunnerUnavailableError)))
            return
        connection.send(Measured(time.perf_counter() - start, _peak_rss_bytes()))
        while (call := connection.recv()) is not None:
            try:
                if isinstance(call, Prefill):
                    seconds = runner.prefill(call.tokens)
                else:
                    seconds = runner.decode(call.steps)
            except (Gemma4Error, ValueError) as e:
                connection.send(Failed(str(e), False))
                continue
            connection.send(Measured(seconds, _peak_rss_bytes()))
        close_runner(runner)
    except (KeyboardInterrupt, EOFError, ConnectionError):
        pass  # the parent was interrupted or went away: nothing left to answer


class IsolatedRunner:
    """A runner loaded in a child process; `load_s` and `peak_rss_bytes` are the child's."""

    def __init__(self, spec: RunnerSpec) -> None:
        self.title = ENGINE_TITLES[spec.engine]
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, no forked state
        self._connection, child = context.Pipe()
        self._process: Any = context.Process(
            target=_serve, args=(spec, child), name=f"bench-{spec.engine}", daemon=True
        )
        self._process.start()
        child.close()
        try:
            loaded = self._receive()
        except BaseException:
            self.close()
            raise
        self.load_s = loaded.seconds
        self.peak_rss_bytes = loaded.peak_rss_bytes

    def prefill(self, tokens: Sequence[int]) -> float:
        """Seconds for one prefill of `tokens` in a fresh sequence."""
        return self._call(Prefill(list(tokens)))

    def decode(self, steps: np.ndarray) -> float:
        """Seconds for the decode steps of `steps` (one row per sequence)."""
        return self._call(Decode(steps))

    def _call(self, call: Prefill | Decode) -> float:
        try:
            self._connection.send(call)
        except ConnectionError:  # the child's end is closed: it is gone
            raise self._died() from None
        reply = self._receive()
        self.peak_rss_bytes = reply.peak_rss_bytes
        return reply.seconds

    def _receive(self) -> Measured:
        while not self._connection.poll(POLL_S):
            if not self._process.is_alive():
                raise self._died()
        try:
            reply = self._connection.recv()
        except (EOFError, ConnectionResetError):
            raise self._died() from None
        if isinstance(reply, Failed):
            if reply.unavailable:  # its message names what is missing
                raise RunnerUnavailableError(reply.message)
            raise RunnerFailedError(f"{self.title}: {reply.message}")
        return reply

    def _died(self) -> RunnerFailedError:
        """The error for a child that is gone, with how it ended."""
        self._process.join(STOP_TIMEOUT_S)
        return RunnerFailedError(
            f"{self.title}'s benchmark process died ({_exit_reason(self._process)})"
        )

    def close(self) -> None:
        """Stop the child (it frees its engine) and wait for it; kill it if it does not go."""
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # a broken pipe: it is already on its way out
                self._connection.send(None)
            self._process.join(STOP_TIMEOUT_S)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._connection.close()

    def __enter__(self) -> IsolatedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exit_reason(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
