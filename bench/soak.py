"""Soak test (not run in CI): `pygemma4 serve` on the demo model under minutes of mixed load.

The load: greedy completions and chats, streamed and whole, over ZeroMQ and HTTP; streams
cancelled after a few chunks; HTTP streams whose client disconnects mid-stream; oversized and
malformed requests; and every --kill-every seconds a worker SIGKILLed (decode and
tokenizer in turn). Recorded: every request's outcome, errors by kind, the RSS and open file
descriptors of every process over time (a PNG plot), and what is left in /dev/shm and among the
abstract sockets after shutdown.

The bars it checks:
- no request lost (every one ends: a result, an error, or its cancellation) or mixed (each
  greedy result is the token ids an in-process Engine gives for that prompt);
- the requests a killed worker held fail within 1 s, and the server serves again afterwards;
- the private RSS (less the shared KV pool's pages, bounded by the pool's size) and open fds
  of each process grow less than 5% over the last two thirds of the run;
- nothing left behind after SIGTERM.

    python bench/soak.py --minutes 10 --out bench/results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import msgspec
import psutil
import zmq
import zmq.asyncio

from pygemma4 import Engine, protocol
from pygemma4.client import AsyncClient, ServerError
from pygemma4.models.demo import demo_model_path

READY_LINE = "pygemma4 serving"
MAX_MESSAGE_BYTES = 64 * 1024
OUTPUT_TOKENS = 16
PROMPTS = [
    " ".join(["The model reads a text as a list of tokens."] * (1 + i % 5)) + f" Case {i}."
    for i in range(12)
]
# How often each kind of request is sent, relative to the others.
MIX = {
    "complete": 5,
    "stream": 5,
    "chat": 3,
    "stream_cancel": 3,
    "http_chat": 2,
    "http_disconnect": 2,
    "malformed": 1,
    "oversized_zmq": 1,
    "oversized_http": 1,
    "bad_params": 1,
}
FAILURE_BAR_S = 1.0
GROWTH_BAR = 0.05
WARMUP_S = 30.0  # a restarted worker's first seconds, while it fills its caches


@dataclass
class Outcome:
    """One request: what it was, when, and how it ended."""

    kind: str
    started: float
    ended: float = 0.0
    result: str = ""  # "ok", "cancelled", "refused:<code>", "error:<code or type>", "lost"
    wrong: bool = False  # a greedy result that is not its own prompt's


@dataclass
class Kill:
    """One worker SIGKILLed, and what followed."""

    worker: str
    pid: int
    at: float
    held: int = 0  # requests in flight when it died that then failed
    slowest_failure_s: float = 0.0
    healthy_after_s: float | None = None
    served_after_s: float | None = None


@dataclass
class Soak:
    """The running soak: the server, the outcomes and the samples."""

    endpoint: str
    http: str
    started: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: dict[int, Outcome] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    stop: bool = False

    def now(self) -> float:
        return time.monotonic() - self.started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, endpoint: str, http: str, threads: int) -> subprocess.Popen:
    """`pygemma4 serve` on the demo model, once it says it serves."""
    out = open(workdir / "serve.stdout", "wb")  # noqa: SIM115 - the server's whole life
    err = open(workdir / "serve.stderr", "wb")  # noqa: SIM115
    command = [sys.executable, "-m", "pygemma4", "serve", "--endpoint", endpoint, "--http", http]
    command += ["--threads", str(threads), "--max-message-bytes", str(MAX_MESSAGE_BYTES)]
    process = subprocess.Popen(
        command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while READY_LINE not in (workdir / "serve.stdout").read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"serve did not start:\n{(workdir / 'serve.stderr').read_text()}")
        time.sleep(0.1)
    return process


def references(prompts: list[str]) -> dict[str, tuple[int, ...]]:
    """Each prompt's greedy continuation by an in-process Engine on the same model."""
    engine = Engine(demo_model_path(), threads=1)
    tokenizer = engine.tokenizer
    return {
        p: tuple(engine.generate(tokenizer.encode(p), OUTPUT_TOKENS, stop_tokens=()))
        for p in prompts
    }


async def load(soak: Soak, expected: dict[str, tuple[int, ...]], seed: int) -> None:
    """One client's loop of requests of random kinds until the soak stops."""
    rng = random.Random(seed)
    kinds = [k for k, weight in MIX.items() for _ in range(weight)]
    async with (
        AsyncClient(soak.endpoint, timeout=60) as client,
        httpx.AsyncClient(base_url=f"http://{soak.http}/v1", timeout=60) as http,
    ):
        http.headers["x-model"] = (await http.get("/models")).json()["data"][0]["id"]
        while not soak.stop:
            kind = rng.choice(kinds)
            prompt = rng.choice(PROMPTS)
            outcome = Outcome(kind, soak.now())
            soak.outcomes.append(outcome)
            key = id(outcome)
            soak.in_flight[key] = outcome
            try:
                outcome.result, tokens = await asyncio.wait_for(
                    REQUESTS[kind](client, http, prompt, rng), timeout=90
                )
                if tokens is not None and tokens != expected[prompt]:
                    outcome.wrong = True
            except ServerError as e:
                outcome.result = f"error:{e.code}"
            except (asyncio.TimeoutError, TimeoutError):
                outcome.result = "lost"
            except Exception as e:  # noqa: BLE001 - every other ending is counted by its type
                outcome.result = f"error:{type(e).__name__}"
            outcome.ended = soak.now()
            del soak.in_flight[key]


Result = tuple[str, "tuple[int, ...] | None"]


async def complete(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    result = await client.complete(prompt, OUTPUT_TOKENS, temperature=0, ignore_eos=True)
    return "ok", tuple(result.token_ids)


async def stream(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    ids: list[int] = []
    async for chunk in client.stream(prompt, OUTPUT_TOKENS, temperature=0, ignore_eos=True):
        ids.extend(chunk.token_ids)
    return "ok", tuple(ids)


async def chat(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    messages = [{"role": "user", "content": prompt}]
    await client.chat(messages, OUTPUT_TOKENS, temperature=0.8, seed=rng.randrange(1 << 30))
    return "ok", None


async def stream_cancel(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    stream = client.stream(prompt, OUTPUT_TOKENS, temperature=0, ignore_eos=True)
    after = rng.randrange(1, 4)
    async for i, _ in _enumerate(stream):
        if i + 1 >= after:
            await stream.cancel()
            return "cancelled", None
    return "ok", None


async def _enumerate(stream):
    i = 0
    async for chunk in stream:
        yield i, chunk
        i += 1


async def http_chat(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    body = {"model": _model(http), "messages": [{"role": "user", "content": prompt}]}
    response = await http.post("/chat/completions", json={**body, "max_tokens": OUTPUT_TOKENS})
    return _http_result(response), None


async def http_disconnect(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    body = {"model": _model(http), "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "stream": True}
    async with http.stream("POST", "/completions", json=body) as response:
        if response.status_code != 200:
            return _http_result(response), None
        lines = 0
        async for _ in response.aiter_lines():
            lines += 1
            if lines >= 3:
                break  # leaving the block closes the connection mid-stream
    return "cancelled", None


async def malformed(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    frames = [
        b"\xc1 not msgpack",
        msgspec.msgpack.encode({"type": "completion", "id": 1, "prompt": 7}),
        msgspec.msgpack.encode({"type": "chat", "id": 2, "messages": [{"role": 5}]}),
        msgspec.msgpack.encode({"type": "nonsense", "id": 3}),
    ]
    return await _raw_exchange(client, rng.choice(frames))


async def oversized_zmq(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    big = protocol.encode(protocol.Completion(id=9, prompt="x " * MAX_MESSAGE_BYTES))
    return await _raw_exchange(client, big)


async def _raw_exchange(client: AsyncClient, frame: bytes) -> Result:
    context = zmq.asyncio.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(client.endpoint)
    try:
        await dealer.send(frame)
        if not await dealer.poll(30_000):
            return "lost", None
        reply = protocol.decode_reply(await dealer.recv())
    finally:
        dealer.close()
    if isinstance(reply, protocol.Error):
        return f"refused:{reply.code}", None
    return f"error:unexpected {type(reply).__name__}", None


async def oversized_http(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    body = {"model": _model(http), "prompt": "x" * (2 * MAX_MESSAGE_BYTES), "max_tokens": 1}
    return _http_result(await http.post("/completions", json=body)), None


async def bad_params(client: AsyncClient, http: httpx.AsyncClient, prompt: str, rng) -> Result:
    body = {"model": _model(http), "prompt": prompt, "temperature": -1, "top_p": 7}
    return _http_result(await http.post("/completions", json=body)), None


def _model(http: httpx.AsyncClient) -> str:
    """The served model's id (asked of /v1/models when the client started)."""
    return http.headers["x-model"]


def _http_result(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "ok"
    if 400 <= response.status_code < 500:
        return f"refused:http {response.status_code}"
    return f"error:http {response.status_code}"


REQUESTS = {
    "complete": complete,
    "stream": stream,
    "chat": chat,
    "stream_cancel": stream_cancel,
    "http_chat": http_chat,
    "http_disconnect": http_disconnect,
    "malformed": malformed,
    "oversized_zmq": oversized_zmq,
    "oversized_http": oversized_http,
    "bad_params": bad_params,
}


def process_names(server: psutil.Process, workers: list[protocol.WorkerState]) -> dict[int, str]:
    """Every process of the server by pid: the supervisor, its workers by name, and any
    other child (the HTTP front end) by its module."""
    names = {server.pid: "supervisor"}
    names.update({w.pid: w.name for w in workers if w.pid})
    for child in server.children(recursive=True):
        if child.pid not in names:
            with contextlib.suppress(psutil.Error):
                argv = child.cmdline()
                module = next((a for a in argv if a.startswith("pygemma4.")), "child")
                names[child.pid] = module.rsplit(".", 1)[-1]
    return names


async def monitor(soak: Soak, server: psutil.Process, every: float) -> None:
    """Sample RSS and open fds of every server process every `every` seconds."""
    async with AsyncClient(soak.endpoint, timeout=10) as client:
        while not soak.stop:
            try:
                workers = (await client.health()).workers
            except Exception:  # noqa: BLE001 - a restarting server may not answer in time
                workers = []
            for pid, name in process_names(server, workers).items():
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(pid)
                    memory = p.memory_info()
                    soak.samples.append(
                        {
                            "t": soak.now(),
                            "name": name,
                            "pid": pid,
                            "rss": memory.rss,
                            "private": memory.rss - memory.shared,
                            "fds": p.num_fds(),
                        }
                    )
            await asyncio.sleep(every)


async def killer(soak: Soak, every: float) -> None:
    """SIGKILL the decode and tokenizer workers in turn, every `every` seconds, and
    time how the requests they held fail and how soon the server serves again."""
    victims = ["decode", "tokenizer-0"]
    async with AsyncClient(soak.endpoint, timeout=10) as client:
        n = 0
        while True:
            await asyncio.sleep(every)
            if soak.stop:
                return
            name = victims[n % len(victims)]
            n += 1
            worker = next(w for w in (await client.health()).workers if w.name == name)
            held = list(soak.in_flight.values())
            kill = Kill(name, worker.pid, soak.now())
            os.kill(worker.pid, signal.SIGKILL)
            soak.kills.append(kill)
            await asyncio.sleep(3)
            failed = [
                o.ended - kill.at
                for o in held
                if o.ended and o.result == "error:worker_failed" and o.ended >= kill.at
            ]
            kill.held = len(failed)
            kill.slowest_failure_s = max(failed, default=0.0)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if (await client.health()).ok:
                        kill.healthy_after_s = soak.now() - kill.at
                        break
                await asyncio.sleep(0.1)
            with contextlib.suppress(Exception):
                await client.complete(PROMPTS[0], 2, temperature=0)
                kill.served_after_s = soak.now() - kill.at


def growth(samples: list[dict], duration: float) -> dict[str, dict[str, float]]:
    """Per process name, the growth of RSS (all, and private: less the pages of shared memory,
    the KV pool's, which fill up to the pool's size as its blocks are first used) and fds
    over the last two thirds of the run: the
    mean of the last quarter of that window over the mean of its first quarter, for the
    process that ran last under that name (from WARMUP_S after it started, where a restart
    falls in the window)."""
    out = {}
    for name in sorted({s["name"] for s in samples}):
        mine = [s for s in samples if s["name"] == name]
        last_pid = mine[-1]["pid"]
        born = min(s["t"] for s in mine if s["pid"] == last_pid)
        start = max(duration / 3, born + WARMUP_S if born > 0 else 0.0)
        window = [s for s in mine if s["pid"] == last_pid and s["t"] >= start]
        if len(window) < 8:
            continue
        quarter = len(window) // 4
        first, last = window[:quarter], window[-quarter:]
        rss, private, fds = (_means(first, last, key) for key in ("rss", "private", "fds"))
        out[name] = {
            "from_s": round(window[0]["t"], 1),
            "rss_start_mb": round(rss[0] / 2**20, 1),
            "rss_end_mb": round(rss[1] / 2**20, 1),
            "rss_growth": round(rss[1] / rss[0] - 1, 4),
            "private_start_mb": round(private[0] / 2**20, 1),
            "private_end_mb": round(private[1] / 2**20, 1),
            "private_growth": round(private[1] / private[0] - 1, 4),
            "fds_start": round(fds[0], 1),
            "fds_end": round(fds[1], 1),
            "fds_growth": round(fds[1] / fds[0] - 1, 4),
        }
    return out


def _means(first: list[dict], last: list[dict], key: str) -> tuple[float, float]:
    return (sum(s[key] for s in first) / len(first), sum(s[key] for s in last) / len(last))


def plot(samples: list[dict], kills: list[Kill], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rss_axes, private_axes, fd_axes) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)
    for name in sorted({s["name"] for s in samples}):
        mine = [s for s in samples if s["name"] == name]
        t = [s["t"] / 60 for s in mine]
        rss_axes.plot(t, [s["rss"] / 2**20 for s in mine], ".-", markersize=2, label=name)
        private_axes.plot(t, [s["private"] / 2**20 for s in mine], ".-", markersize=2)
        fd_axes.plot(t, [s["fds"] for s in mine], ".-", markersize=2)
    for axes in (rss_axes, private_axes, fd_axes):
        for kill in kills:
            axes.axvline(kill.at / 60, color="red", alpha=0.3)
    rss_axes.set_ylabel("RSS (MiB)")
    private_axes.set_ylabel("private RSS (MiB)")
    fd_axes.set_ylabel("open fds")
    fd_axes.set_xlabel("minutes (red: a worker SIGKILLed)")
    rss_axes.legend(fontsize=8, ncol=3)
    rss_axes.set_title("pygemma4 serve (demo model) under mixed load")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def leftovers(server_pid: int, shm_before: set[str]) -> dict[str, list]:
    """What the stopped server left: /dev/shm entries, abstract sockets, worker processes."""
    shm = sorted(set(os.listdir("/dev/shm")) - shm_before)
    prefix = f"@pygemma4-{server_pid}-"
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    sockets = sorted({ln.split()[-1] for ln in lines if ln.split()[-1].startswith(prefix)})
    marker = f'"supervisor_pid":{server_pid}'
    processes = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in a for a in p.info["cmdline"] or ()):
            processes.append(p.info["pid"])
    return {"dev_shm": shm, "abstract_sockets": sockets, "processes": processes}


async def run(args: argparse.Namespace, expected: dict[str, tuple[int, ...]]) -> Soak:
    soak = Soak(args.endpoint, args.http)
    server = psutil.Process(args.server_pid)
    tasks = [asyncio.create_task(load(soak, expected, seed)) for seed in range(args.clients)]
    monitor_task = asyncio.create_task(monitor(soak, server, args.sample_every))
    killer_task = asyncio.create_task(killer(soak, args.kill_every))
    await asyncio.sleep(args.minutes * 60)
    soak.stop = True
    await asyncio.gather(*tasks, monitor_task)
    killer_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await killer_task
    return soak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The server's own output, for a look after the run; not a result to keep.
    workdir = Path("build") / "soak-server"
    workdir.mkdir(parents=True, exist_ok=True)

    expected = references(PROMPTS)
    shm_before = set(os.listdir("/dev/shm"))
    args.endpoint = f"tcp://127.0.0.1:{free_port()}"
    args.http = f"127.0.0.1:{free_port()}"
    process = start_server(workdir, args.endpoint, args.http, args.threads)
    args.server_pid = process.pid
    try:
        soak = asyncio.run(run(args, expected))
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    left = leftovers(process.pid, shm_before)
    duration = args.minutes * 60

    results = Counter(o.result for o in soak.outcomes)
    by_kind = {
        kind: dict(Counter(o.result for o in soak.outcomes if o.kind == kind)) for kind in MIX
    }
    grown = growth(soak.samples, duration)
    summary = {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": len(soak.outcomes),
        "results": dict(results),
        "by_kind": by_kind,
        "lost": results.get("lost", 0),
        "wrong_greedy_results": sum(o.wrong for o in soak.outcomes),
        "kills": [asdict(k) for k in soak.kills],
        "growth_last_two_thirds": grown,
        "server_exit_code": code,
        "left_after_shutdown": left,
    }
    bars = {
        "no request lost or mixed": summary["lost"] == 0 and summary["wrong_greedy_results"] == 0,
        "killed workers' requests failed within 1 s": all(
            k.slowest_failure_s < FAILURE_BAR_S for k in soak.kills
        ),
        "served again after every kill": all(k.served_after_s is not None for k in soak.kills),
        "private RSS and fds grew < 5% over the last 2/3": all(
            g["private_growth"] < GROWTH_BAR and g["fds_growth"] < GROWTH_BAR
            for g in grown.values()
        ),
        "nothing left after shutdown": code == 0 and not any(left.values()),
    }
    summary["bars"] = bars
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(soak.samples, soak.kills, args.out.with_suffix(".png"))
    (args.out.parent / (args.out.name + "-samples.json")).write_text(json.dumps(soak.samples))
    print(json.dumps(summary, indent=2))
    sys.exit(0 if all(bars.values()) else 1)


if __name__ == "__main__":
    main()
