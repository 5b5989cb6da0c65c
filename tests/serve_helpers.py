"""Running the real `pygemma4 serve` as a subprocess in tests: starting it, finding its worker
processes and files, stopping it and checking it left nothing behind, and talking to it over a
raw ZeroMQ DEALER socket where the client would refuse to send what a test sends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import zmq

from pygemma4 import protocol
from pygemma4.client import Client

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
READY_LINE = "pygemma4 serving"


def free_port() -> int:
    """A loopback tcp port nothing listens on (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_endpoint() -> str:
    """A loopback tcp endpoint with a port nothing listens on (at the time of the call)."""
    return f"tcp://127.0.0.1:{free_port()}"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` every 50 ms until it holds; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout:g} s")
        time.sleep(0.05)


def pid_exists(pid: int) -> bool:
    """Whether a process (or an unreaped zombie) with this id exists."""
    return Path(f"/proc/{pid}").exists()


def serve_command(model: Path | str, *args: str) -> list[str]:
    """The command line of `pygemma4 serve MODEL ARGS` run by this interpreter, without the
    HTTP API unless ARGS ask for it (tests run side by side: none may take the default port)."""
    http = () if "--http" in args else ("--http", "off")
    return [sys.executable, "-m", "pygemma4", "serve", str(model), *args, *http]


def run_serve(
    model: Path | str, *args: str, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `pygemma4 serve` to its end (for invocations that must fail at once)."""
    return subprocess.run(
        serve_command(model, *args),
        capture_output=True,
        text=True,
        cwd=cwd,  # away from the source tree, so that the installed package is imported
        timeout=timeout,
        check=False,
    )


class ServeProcess:
    """A `pygemma4 serve` subprocess; `start` returns once it printed that it serves."""

    def __init__(
        self,
        model: Path,
        workdir: Path,
        endpoint: str,
        args: tuple[str, ...],
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.client_options = client_options or {}
        """What every `client()` of this server gets (CURVE keys)."""
        self.workdir = workdir
        self.endpoint = endpoint
        self.args = args
        self.stdout_path = workdir / "serve.stdout"
        self.stderr_path = workdir / "serve.stderr"
        self.process: subprocess.Popen[bytes] | None = None
        self.worker_pids: set[int] = set()
        """Every worker pid seen (through `workers()`), restarted ones included."""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        """What the server printed so far, for failure messages."""
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"--- stdout\n{out}--- stderr\n{err[-4000:]}"

    def start(self) -> ServeProcess:
        """Start the server and wait until it serves; learn its workers."""
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                serve_command(self.model, "--endpoint", self.endpoint, *self.args),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,  # away from the source tree: the installed package runs
                start_new_session=True,  # a group of its own, as a server started in a shell
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while READY_LINE not in self.stdout_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"serve exited with {self.process.returncode}\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"serve not ready after {START_TIMEOUT_S:g} s\n{self.output()}"
                )
            time.sleep(0.05)
        self.workers()
        return self

    def client(self, timeout: float = 30.0) -> Client:
        """A new synchronous client of this server."""
        return Client(self.endpoint, timeout=timeout, **self.client_options)

    def health(self) -> protocol.HealthStatus:
        """The server's health reply (its worker pids are recorded); fails at once where the
        server has exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}\n{self.output()}")
        with self.client(timeout=10) as client:
            status = client.health()
        self.worker_pids.update(w.pid for w in status.workers if w.pid)
        return status

    def workers(self) -> list[protocol.WorkerState]:
        """The workers as the server reports them."""
        return self.health().workers

    def worker(self, name: str) -> protocol.WorkerState:
        """The worker called `name` ("decode", "tokenizer-0", ...)."""
        return next(w for w in self.workers() if w.name == name)

    def wait_healthy(self, timeout: float = 30.0) -> protocol.HealthStatus:
        """The health reply once every worker is up (bounded poll)."""
        status: list[protocol.HealthStatus] = []

        def healthy() -> bool:
            status[:] = [self.health()]
            return status[0].ok

        wait_until(healthy, timeout, "every worker alive again")
        return status[0]

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Return once the server has no request in flight (bounded poll)."""
        wait_until(lambda: self.health().requests_in_flight == 0, timeout, "no request in flight")

    def assert_decode_idle(self, window: float = 0.5) -> None:
        """The decode worker uses (next to) no CPU over `window` seconds: it generates for no
        one, where a generating one uses a whole core."""
        pid = self.worker("decode").pid
        before = cpu_seconds(pid)
        time.sleep(window)
        used = cpu_seconds(pid) - before
        assert used < 0.2 * window, f"the decode worker used {used:.2f} s of CPU in {window} s"

    def sockets(self) -> list[str]:
        """The names of this server's internal sockets (in Linux's abstract namespace)."""
        prefix = f"@pygemma4-{self.pid}-"
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
        return sorted({line.split()[-1] for line in lines if line.split()[-1].startswith(prefix)})

    def live_workers(self) -> list[int]:
        """The worker pids seen that still run as this server's workers."""
        return [pid for pid in self.worker_pids if _is_worker_of(pid, self.pid)]

    def stop(self, sig: signal.Signals = signal.SIGTERM, group: bool = False) -> int:
        """Send `sig` (with `group`, to the server's whole process group, as Ctrl-C in its
        terminal would) and return the exit code, killing it if it does not exit in time."""
        assert self.process is not None
        if self.process.poll() is None:
            if group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"serve did not exit within {STOP_TIMEOUT_S:g} s of {sig.name}\n{self.output()}"
            ) from None

    def assert_left_nothing(self) -> None:
        """After the server exited: no worker process or socket of it remains (the KV pool,
        a memory file without a name, goes with the last process that maps it)."""
        assert self.process is not None and self.process.poll() is not None
        assert not self.live_workers(), f"worker processes still running: {self.live_workers()}"
        assert not self.sockets(), f"sockets left: {self.sockets()}"

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        model: Path,
        workdir: Path,
        *args: str,
        endpoint: str | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> Iterator[ServeProcess]:
        """A started server; on exit it is stopped with SIGTERM, which must end it with code 0
        and leave nothing behind."""
        server = cls(model, workdir, endpoint or free_tcp_endpoint(), args, client_options)
        server.start()
        try:
            yield server
        finally:
            code = server.stop(signal.SIGTERM)
            assert code == 0, f"serve exited with {code} on SIGTERM\n{server.output()}"
            server.assert_left_nothing()


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system, all threads) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _is_worker_of(pid: int, serve_pid: int) -> bool:
    """Whether `pid` is (still) a worker process of the server `serve_pid` (whose pid its
    configuration, on its command line, names)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f'"supervisor_pid":{serve_pid}'.encode() in argv


class RawDealer:
    """A bare DEALER socket for sending what no client would: any frames, any bytes."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def send_message(self, message: dict[str, Any] | Any) -> None:
        """Send one MessagePack-encoded value as one frame."""
        self.send(msgspec.msgpack.encode(message))

    def receive(self, timeout: float = 10.0) -> protocol.ServerReply | None:
        """The next reply, decoded; None when none came within `timeout` seconds."""
        if not self.socket.poll(int(timeout * 1000)):
            return None
        frames = self.socket.recv_multipart()
        assert len(frames) == 1, f"a reply of {len(frames)} frames"
        return protocol.decode_reply(frames[0])

    def exchange(self, *frames: bytes, timeout: float = 10.0) -> protocol.ServerReply:
        """Send one message and return the reply it gets (failing when none comes)."""
        self.send(*frames)
        reply = self.receive(timeout)
        assert reply is not None, f"no reply within {timeout:g} s to {frames!r:.200}"
        return reply

    def next_ending(self, timeout: float = 10.0) -> protocol.ServerReply:
        """The next reply that is not a Chunk (failing when none comes)."""
        while True:
            reply = self.receive(timeout)
            assert reply is not None, f"no reply within {timeout:g} s"
            if not isinstance(reply, protocol.Chunk):
                return reply

    def close(self) -> None:
        self.context.destroy(linger=0)

    def __enter__(self) -> RawDealer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
