"""Starting, watching, restarting and stopping the worker processes of one server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pygemma4.curve import KeyPair
from pygemma4.protocol import WorkerState
from pygemma4.workers.runtime import (
    HTTP_API_KEY_ENV,
    HTTP_CURVE_KEYS_ENV,
    HTTP_ROUTING_ID_ENV,
    ServerConfig,
    encode_config,
)

# A worker that dies this soon after it started is restarted only after the same delay, so
# that one failing at load does not spin.
QUICK_DEATH_S = 1.0
STOP_GRACE_S = 5.0


@dataclass
class WorkerProcess:
    """One worker: its module, its current process and how often it was restarted."""

    name: str
    module: str
    group: str
    """Workers of one group share state (the KV pool) and are restarted together."""
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = -1
    epoch: int = 0
    restart_at: float | None = None
    ready: bool = False
    holds_requests: bool = True
    """Whether requests live in it (the HTTP front end only passes them to the server, which
    sees its connection go when it dies)."""
    env: dict[str, str] | None = None
    """What its environment adds to the supervisor's."""

    @property
    def pid(self) -> int:
        """The current process id (0 while none runs)."""
        return self.process.pid if self.process is not None else 0

    def alive(self) -> bool:
        """Whether the current process runs."""
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """The worker processes of a server, described by its configuration."""

    def __init__(
        self,
        config: ServerConfig,
        http_api_key: str | None = None,
        http_curve_keys: KeyPair | None = None,
        http_routing_id: bytes | None = None,
    ) -> None:
        """`http_api_key` is the key the HTTP front end requires, if any, `http_curve_keys`
        its CURVE pair under CURVE, and `http_routing_id` the name its connection to the front
        end goes by (all given in its environment, never on a command line)."""
        self.config = config
        self.config_text = encode_config(config)
        self.epoch = 0
        workers = [
            WorkerProcess(n, "pygemma4.workers.tokenizer", n) for n in config.tokenizer_names()
        ]
        workers.append(WorkerProcess("decode", "pygemma4.workers.decode", "kv"))
        if config.http is not None:
            env = {} if http_api_key is None else {HTTP_API_KEY_ENV: http_api_key}
            if http_curve_keys is not None:
                env[HTTP_CURVE_KEYS_ENV] = http_curve_keys.text()
            if http_routing_id is not None:
                env[HTTP_ROUTING_ID_ENV] = http_routing_id.hex()
            workers.append(
                WorkerProcess(
                    "http", "pygemma4.workers.http", "http", holds_requests=False, env=env
                )
            )
        self.workers = {w.name: w for w in workers}

    def start_all(self) -> None:
        """Start every worker."""
        for worker in self.workers.values():
            self._start(worker)

    def _start(self, worker: WorkerProcess) -> None:
        self.epoch += 1
        worker.epoch = self.epoch
        worker.restarts += 1
        worker.ready = False
        worker.restart_at = None
        # The root as working directory keeps a source checkout out of the worker's import
        # path: it must load the installed package with its compiled core.
        worker.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                worker.module,
                worker.name,
                str(worker.epoch),
                self.config_text,
            ],
            cwd="/",
            pass_fds=(self.config.kv.fd,) if self.config.kv.kind == "shm" else (),
            env={**os.environ, **worker.env} if worker.env else None,
        )
        worker.started_at = time.monotonic()

    def reap(self) -> list[WorkerProcess]:
        """The workers holding requests that died since the last call, with the rest of
        their group; every worker that died and its group are stopped and scheduled to
        restart."""
        dead = [w for w in self.workers.values() if w.process is not None and not w.alive()]
        groups = {w.group for w in dead}
        for worker in self.workers.values():
            if worker.group in groups and worker.process is not None:
                if worker.alive():
                    worker.process.kill()
                worker.process.wait()
                quick = time.monotonic() - worker.started_at < QUICK_DEATH_S
                worker.restart_at = time.monotonic() + (QUICK_DEATH_S if quick else 0.0)
                worker.process = None
        return [w for w in self.workers.values() if w.group in groups and w.holds_requests]

    def restart_due(self) -> None:
        """Start the workers whose restart time has come."""
        now = time.monotonic()
        for worker in self.workers.values():
            if (
                worker.process is None
                and worker.restart_at is not None
                and worker.restart_at <= now
            ):
                self._start(worker)

    def states(self) -> list[WorkerState]:
        """Every worker as health replies report it."""
        return [
            WorkerState(name=w.name, pid=w.pid, alive=w.alive() and w.ready, restarts=w.restarts)
            for w in self.workers.values()
        ]

    def stop_all(self) -> None:
        """SIGTERM every worker, then SIGKILL those still running after a grace period."""
        running = [w for w in self.workers.values() if w.alive()]
        for worker in running:
            worker.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in running:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                worker.process.kill()  # type: ignore[union-attr]
                worker.process.wait()  # type: ignore[union-attr]
