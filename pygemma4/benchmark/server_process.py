"""A real `pygemma4 serve` in a subprocess, for benchmarks that need a server of their own.

`started_server` starts one on a private `ipc://` endpoint, returns once it serves, and stops it
(SIGTERM, then SIGKILL) when the block ends. A server that fails to start raises
`ServerStartError` with what it printed on stderr.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from pygemma4.errors import Gemma4Error

__all__ = ["READY_PREFIX", "ServerStartError", "serve_command", "started_server"]

READY_PREFIX = "pygemma4 serving"
"""How the line `pygemma4 serve` prints on stdout once it serves begins."""

STDERR_TAIL_BYTES = 8192
"""How much of the end of the server's stderr is kept for error messages."""

_EOF = None  # what the stdout reader hands over when the pipe closes


class ServerStartError(Gemma4Error):
    """The server exited before it served, or did not serve within the time allowed."""


def serve_command(model: Path | None, endpoint: str, args: Sequence[str] = ()) -> list[str]:
    """The command line of `pygemma4 serve [MODEL] --endpoint ENDPOINT ARGS`, run by this
    interpreter; without the HTTP API unless ARGS ask for it (the bench measures the ZeroMQ
    endpoint, and must not take the HTTP port of a server running beside it)."""
    model_args = [str(model)] if model is not None else []
    http = [] if "--http" in args else ["--http", "off"]
    command = [sys.executable, "-m", "pygemma4", "serve", *model_args, "--endpoint", endpoint]
    return [*command, *args, *http]


class _Output:
    """The server's stdout lines (handed over one by one) and the tail of its stderr, each read
    by a daemon thread of its own so that neither pipe can fill up and block the server."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None and process.stderr is not None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: collections.deque[bytes] = collections.deque()
        self._stderr_bytes = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(process.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(process.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self, pipe: IO[bytes]) -> None:
        with pipe:
            for line in pipe:
                self.lines.put(line.decode(errors="replace"))
        self.lines.put(_EOF)

    def _read_stderr(self, pipe: IO[bytes]) -> None:
        with pipe:
            while block := os.read(pipe.fileno(), 4096):
                with self._lock:
                    self._stderr.append(block)
                    self._stderr_bytes += len(block)
                    while self._stderr_bytes - len(self._stderr[0]) >= STDERR_TAIL_BYTES:
                        self._stderr_bytes -= len(self._stderr.popleft())

    def stderr_tail(self, max_chars: int = 2000) -> str:
        """The last lines the server printed on stderr (whole lines, at most about
        `max_chars`), or a note that it printed nothing."""
        with self._lock:
            text = b"".join(self._stderr).decode(errors="replace")
        text = text.replace("\r", "\n").strip()
        if not text:
            return "(nothing on stderr)"
        if len(text) > max_chars:
            text = text[-max_chars:]
            text = text.split("\n", 1)[1] if "\n" in text else text
        return text

    def join(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds in all) until both pipes are read to their end."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _wait_until_serving(
    process: subprocess.Popen[bytes], output: _Output, start_timeout: float
) -> None:
    """Return once the server printed its ready line; raise ServerStartError if it exits or
    closes its stdout first, or does not print it within `start_timeout` seconds."""
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            line = output.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise ServerStartError(
                f"the server was not serving within {start_timeout:g} s: {output.stderr_tail()}"
            ) from None
        if line is _EOF:
            break
        if line.startswith(READY_PREFIX):
            return
    # Its stdout closed: it is exiting, or has; give it a moment to say with what status.
    try:
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ServerStartError(
            f"the server closed its output without serving: {output.stderr_tail()}"
        ) from None
    output.join(timeout=1.0)  # the last of stderr, which says why
    raise ServerStartError(
        f"the server exited with status {status} before serving: {output.stderr_tail()}"
    )


def _stop(process: subprocess.Popen[bytes], stop_timeout: float) -> None:
    """End the server: SIGTERM (on which it stops its workers), SIGKILL if it outlasts
    `stop_timeout` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def started_server(
    model: Path | None,
    *,
    args: Sequence[str] = (),
    start_timeout: float = 600.0,
    stop_timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Run `pygemma4 serve MODEL ARGS` (the demo model where `model` is None) on a fresh
    `ipc://` endpoint and yield that endpoint once the server serves; stop the server and
    remove the endpoint's directory when the block ends.

    `args` are further options of `pygemma4 serve` (not `--endpoint`); `env` adds to or
    overrides this process's environment for the server. Raises ServerStartError, naming the
    problem and quoting the end of the server's stderr, where the server exits before serving
    or does not serve within `start_timeout` seconds.
    """
    directory = Path(tempfile.mkdtemp(prefix="pygemma4-bench-"))
    endpoint = f"ipc://{directory}/serve"
    process: subprocess.Popen[bytes] | None = None
    output: _Output | None = None
    try:
        process = subprocess.Popen(
            serve_command(model, endpoint, args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # From the root, so that a source checkout in the working directory does not shadow
            # the installed package and its compiled core.
            cwd="/",
            env=None if env is None else {**os.environ, **env},
        )
        output = _Output(process)
        _wait_until_serving(process, output, start_timeout)
        yield endpoint
    finally:
        # Also on a failed start or Ctrl-C: no server may outlive the block.
        if process is not None:
            _stop(process, stop_timeout)
        if output is not None:
            output.join(timeout=1.0)
        shutil.rmtree(directory, ignore_errors=True)
