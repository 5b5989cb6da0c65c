"""The real server end to end: `pygemma4 serve` on the demo model as a subprocess, spoken to
over real sockets by `Client` / `AsyncClient` and by a raw DEALER.

What it must do: give exactly the in-process `Engine`'s tokens and text (greedy, with and
without end-of-generation tokens, streamed or not, prompts longer than a prefill chunk, seeded
sampling); serve many concurrent streams without losing, duplicating or mixing tokens; fail the
requests of a worker that dies within a second and recover; answer every malformed message
with an error and never crash; refuse what does not fit with the right error code; and stop on
SIGINT / SIGTERM leaving no process, shared memory or runtime file behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from serve_helpers import (
    RawDealer,
    ServeProcess,
    free_tcp_endpoint,
    pid_exists,
    run_serve,
    wait_until,
)

from pygemma4 import Engine, SamplingParams, protocol
from pygemma4.client import (
    AsyncClient,
    AsyncCompletionStream,
    Client,
    CompletionResult,
    RequestTimeoutError,
    ServerBusyError,
    ServerError,
    WorkerFailedError,
)

N_CTX = 256
PREFILL_CHUNK = 16
MESSAGE_LIMIT = 4096
MAIN_ARGS = tuple(
    f"--threads 1 --max-batch 16 --n-ctx {N_CTX} --prefill-chunk {PREFILL_CHUNK} "
    f"--max-message-bytes {MESSAGE_LIMIT}".split()
)
"""The shared server: a small context (for context errors), prefill in chunks of 16 tokens
(every longer prompt is cut) and a small message limit (for the size errors)."""

LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the deep "
    "green forest where the old trees stand tall and quiet under the pale evening sky."
)

Prompt = str | list[int] | list[dict[str, str]]
"""Text, token ids, or the messages of a chat."""

LONG = 4000
"""max_tokens of a stream that must still run while a test acts (seconds on this model)."""

PARITY_PROMPTS: dict[str, Prompt] = {
    "short text": "Hello",
    "long text": LONG_TEXT,
    "token ids": [2, 12],
    "chat": [{"role": "user", "content": "Tell me a story"}],
}


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_model_file: Path) -> Engine:
    """The in-process reference."""
    return Engine(demo_model_file, threads=1)


@pytest.fixture(scope="module")
def server(
    demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    """The shared server (MAIN_ARGS); tests leave it idle and healthy."""
    with ServeProcess.running(demo_model_file, tmp_path_factory.mktemp("main"), *MAIN_ARGS) as s:
        yield s


def prompt_ids(engine: Engine, prompt: Prompt) -> list[int]:
    """The token ids the server makes of `prompt`."""
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    if is_chat(prompt):
        return engine.tokenizer.encode_chat(prompt)  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def is_chat(prompt: Prompt) -> bool:
    """Whether `prompt` is the messages of a chat."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def text_of(engine: Engine, token_ids: Sequence[int]) -> str:
    """The text a request that generated `token_ids` returns."""
    return engine.tokenizer.decode(token_ids, skip_special=True)


async def complete(client: AsyncClient, prompt: Prompt, n: int, **kw: Any) -> CompletionResult:
    """`complete` or `chat`, as the prompt asks."""
    if is_chat(prompt):
        return await client.chat(prompt, n, **kw)  # type: ignore[arg-type]
    return await client.complete(prompt, n, **kw)  # type: ignore[arg-type]


def stream(client: AsyncClient, prompt: Prompt, n: int, **kw: Any) -> AsyncCompletionStream:
    """`stream` or `stream_chat`, as the prompt asks."""
    if is_chat(prompt):
        return client.stream_chat(prompt, n, **kw)  # type: ignore[arg-type]
    return client.stream(prompt, n, **kw)  # type: ignore[arg-type]


async def read_stream(s: AsyncCompletionStream) -> tuple[list[int], str, int]:
    """Every token id and the text of a stream read to its end, and how many chunks it had."""
    token_ids: list[int] = []
    text: list[str] = []
    chunks = 0
    async for chunk in s:
        chunks += 1
        token_ids.extend(chunk.token_ids)
        text.append(chunk.text)
    return token_ids, "".join(text), chunks


def run(coroutine: Any) -> Any:
    """Run a test's coroutine in an event loop of its own."""
    return asyncio.run(coroutine)


# --- 1. the engine's output, through the server ----------------------------------------------


@pytest.mark.parametrize("ignore_eos", [True, False], ids=["ignore_eos", "eos"])
def test_greedy_output_is_the_engines(
    server: ServeProcess, engine: Engine, ignore_eos: bool
) -> None:
    n = 48
    ends = engine.tokenizer.end_of_generation_ids
    assert len(prompt_ids(engine, LONG_TEXT)) > 2 * PREFILL_CHUNK  # prefilled in chunks

    async def check() -> list[bool]:
        stopped = []
        async with AsyncClient(server.endpoint, timeout=30) as client:
            for name, prompt in PARITY_PROMPTS.items():
                ids = prompt_ids(engine, prompt)
                if ignore_eos:
                    expected = engine.generate(ids, n, stop_tokens=())
                else:
                    expected = engine.generate(ids, n)
                stops = expected[-1] in ends and not ignore_eos
                stopped.append(stops)
                kw: dict[str, Any] = {"temperature": 0, "ignore_eos": ignore_eos}

                result = await complete(client, prompt, n, **kw)
                assert list(result.token_ids) == expected, name
                assert result.text == text_of(engine, expected), name
                assert result.finish_reason == ("stop" if stops else "length"), name
                assert (result.prompt_tokens, result.completion_tokens) == (len(ids), len(expected))

                s = stream(client, prompt, n, **kw)
                token_ids, text, chunks = await read_stream(s)
                assert (token_ids, text) == (list(result.token_ids), result.text), name
                assert chunks == len(expected)  # one chunk per step
                # The stream repeats the prompt: the prefix cache may hold some of it.
                assert s.result is not None
                uncached = dataclasses.replace(s.result, cached_tokens=result.cached_tokens)
                assert uncached == result, name
        return stopped

    stopped = run(check())
    if not ignore_eos:
        # The comparison means something only where the engine stops at an EOS token.
        assert sum(stopped) >= 2, stopped


def test_seeded_sampling_is_the_engines(server: ServeProcess, engine: Engine) -> None:
    n = 40
    params = SamplingParams(temperature=0.8, seed=7)
    prompts = [PARITY_PROMPTS["long text"], PARITY_PROMPTS["chat"], PARITY_PROMPTS["token ids"]]

    async def check() -> None:
        async with AsyncClient(server.endpoint, timeout=30) as client:
            for prompt in prompts:
                expected = engine.generate(prompt_ids(engine, prompt), n, params, stop_tokens=())
                # Several at once: batched with each other, each must still be the engine's.
                results = await asyncio.gather(
                    *(
                        complete(client, prompt, n, temperature=0.8, seed=7, ignore_eos=True)
                        for _ in range(4)
                    )
                )
                for result in results:
                    assert list(result.token_ids) == expected
                    assert result.text == text_of(engine, expected)

    run(check())


# --- 2. many concurrent streams ---------------------------------------------------------------


def test_concurrent_streams_lose_duplicate_and_mix_nothing(
    server: ServeProcess, engine: Engine
) -> None:
    n_clients, n_requests, longest = 64, 500, 40
    rng = random.Random(2024)
    words = LONG_TEXT.replace(",", "").replace(".", "").split()
    prompts: list[Prompt] = [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(10)
    ]
    prompts += [[2, 100, 200, 300], [2, *range(3, 60)]]
    prompts.append([{"role": "user", "content": "What is 2+2?"}])
    references = [engine.generate(prompt_ids(engine, p), longest, stop_tokens=()) for p in prompts]
    jobs = [(rng.randrange(len(prompts)), rng.randint(1, longest)) for _ in range(n_requests)]
    answered: list[tuple[int, int, list[int], str, CompletionResult | None]] = []

    async def client_task(queue: asyncio.Queue[tuple[int, int]]) -> None:
        async with AsyncClient(server.endpoint, timeout=60) as client:
            while not queue.empty():
                which, n = queue.get_nowait()
                s = stream(client, prompts[which], n, temperature=0, ignore_eos=True)
                token_ids, text, _ = await read_stream(s)
                answered.append((which, n, token_ids, text, s.result))

    async def main() -> None:
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        await asyncio.gather(*(client_task(queue) for _ in range(n_clients)))

    run(main())
    assert len(answered) == n_requests
    for which, n, token_ids, text, result in answered:
        expected = references[which][:n]
        assert token_ids == expected, (which, n)
        assert text == text_of(engine, expected), (which, n)
        assert result is not None and result.completion_tokens == n
        assert result.prompt_tokens == len(prompt_ids(engine, prompts[which]))
    server.wait_idle()


# --- 3. workers that die ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_server(
    demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    """A server with the default context of 4096 tokens, for streams long enough to be still
    running when a test cancels them, drops their client or kills a worker (over ipc, so that
    both transports are used)."""
    workdir = tmp_path_factory.mktemp("long")
    endpoint = f"ipc://{workdir}/serve.sock"
    with ServeProcess.running(demo_model_file, workdir, "--threads", "1", endpoint=endpoint) as s:
        yield s


@pytest.mark.parametrize("victim", ["decode", "tokenizer-0"])
def test_a_killed_worker_fails_its_requests_at_once_and_comes_back(
    long_server: ServeProcess, engine: Engine, victim: str
) -> None:
    server = long_server
    prompt = [2, 40, 41, 42, 43, 44]
    before = server.worker(victim)
    assert before.alive

    async def kill_mid_stream() -> None:
        async with AsyncClient(server.endpoint, timeout=30) as client:
            streams = [
                client.stream(prompt, LONG, temperature=0, ignore_eos=True) for _ in range(3)
            ]
            for s in streams:
                await s.__anext__()  # generating now

            async def failure_time(s: AsyncCompletionStream) -> float:
                with pytest.raises(WorkerFailedError):
                    async for _ in s:
                        pass
                return time.monotonic()

            killed = time.monotonic()
            os.kill(before.pid, signal.SIGKILL)
            failed = await asyncio.gather(*(failure_time(s) for s in streams))
            assert max(failed) - killed < 1.0, [t - killed for t in failed]

    run(kill_mid_stream())
    status = server.wait_healthy(timeout=30)
    assert not pid_exists(before.pid)  # reaped, not left a zombie
    after = next(w for w in status.workers if w.name == victim)
    assert after.pid != before.pid and after.restarts == before.restarts + 1
    assert status.requests_in_flight == 0

    async def served_again() -> None:
        async with AsyncClient(server.endpoint, timeout=30) as client:
            result = await client.complete(prompt, 32, temperature=0, ignore_eos=True)
            assert list(result.token_ids) == engine.generate(prompt, 32, stop_tokens=())
            token_ids, _, _ = await read_stream(
                client.stream(LONG_TEXT, 32, temperature=0, ignore_eos=True)
            )
            expected = engine.generate(prompt_ids(engine, LONG_TEXT), 32, stop_tokens=())
            assert token_ids == expected

    run(served_again())


# --- 4. malformed messages --------------------------------------------------------------------


@dataclass
class Case:
    """One fuzz message and the reply it must get."""

    what: str
    frames: list[bytes]
    code: str | None
    """The Error code expected; None: Done, or an "internal" Error (a request the server may
    fail to run but must survive); "none": no reply at all."""
    ids: tuple[int | None, ...] = (None,)
    """The ids the reply may carry."""
    names: str | None = None
    """Text the error message must hold (the field, the limit)."""


MAP_HEADERS = {*range(0x80, 0x90), 0xDE, 0xDF}


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random MessagePack-encodable value, nested up to 4 deep."""
    kinds = ["int", "big", "negative", "float", "odd float", "str", "bytes", "bool", "none"]
    if depth < 4:
        kinds += ["list", "dict"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(0, 1000)
    if kind == "big":
        return rng.choice([2**31, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1])
    if kind == "negative":
        return rng.choice([-1, -(2**31), -(2**63)])
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    if kind == "odd float":
        return rng.choice([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324])
    if kind == "str":
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF)]))
            for _ in range(rng.randint(0, 12))
        )
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 12))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice([f"k{rng.randint(0, 99)}", rng.randint(0, 99)]): random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 4))
    }


def encoded(value: Any) -> bytes:
    """`value` as one MessagePack frame."""
    return msgspec.msgpack.encode(value)


def completion(rid: int, **fields: Any) -> dict[str, Any]:
    """A valid completion request as a plain dict, `fields` replacing or adding fields."""
    return {"type": "completion", "id": rid, "prompt": "hi", "max_tokens": 2, **fields}


BAD_SAMPLING: list[tuple[str, Any]] = [
    ("temperature", -1.0),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", 2.0),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0),
    ("seed", -1),
    ("seed", "seven"),
    ("logprobs", 21),
    ("logprobs", -1),
    ("stop", [""]),
    ("stop", ["x"] * 17),
    ("stop", "y" * 300),
    ("stop", [1]),
    ("beam_width", 4),
]

EXTREME_SAMPLING: list[dict[str, Any]] = [
    {"temperature": 1e30, "top_p": 1e-300, "min_p": 1.0, "seed": 3},
    {"temperature": 1e-300, "repetition_penalty": 1e300, "seed": 3},
    {"temperature": 5.0, "top_k": 2**31 - 1, "presence_penalty": -2.0, "seed": 2**64 - 1},
    {"temperature": 1.0, "min_p": 1.0, "logprobs": 20, "stop": ["a"] * 16},
]


def fuzz_cases(rng: random.Random) -> list[Case]:
    """Every malformed message of the fuzz (seeded), and a few odd but valid ones."""
    cases: list[Case] = []
    for _ in range(60):
        first = rng.choice([b for b in range(256) if b not in MAP_HEADERS])
        cases.append(
            Case(
                "random bytes", [bytes([first]) + rng.randbytes(rng.randint(0, 200))], "bad_request"
            )
        )
    cases.append(Case("empty frame", [b""], "bad_request"))
    for _ in range(40):
        value = random_value(rng)
        while isinstance(value, dict):
            value = random_value(rng)
        cases.append(Case("not a map", [encoded(value)], "bad_request"))
    for _ in range(30):
        junk: dict[Any, Any] = {f"k{i}": random_value(rng, 2) for i in range(rng.randint(0, 3))}
        junk["type"] = rng.choice(["completion", "chat", "health", "cancel", "nope", 3])
        junk[f"junk{rng.randint(0, 9)}"] = random_value(rng)
        cases.append(Case("a map without an id", [encoded(junk)], "bad_request"))
    for bad_id in [-1, 2**63, 2**64 - 1, "7", 1.0, True, None, [7], {"id": 7}]:
        message = completion(0, id=bad_id)
        cases.append(Case(f"id {bad_id!r}", [encoded(message)], "bad_request", names="id"))

    def readable(what: str, code: str, names: str | None, **fields: Any) -> None:
        rid = rng.choice([rng.randint(0, 1000), rng.randrange(2**63)])
        cases.append(Case(what, [encoded(completion(rid, **fields))], code, (rid,), names))

    for _ in range(30):
        field = f"junk{rng.randint(0, 99)}"
        readable("an unknown field", "bad_request", field, **{field: random_value(rng)})
    wrong_types: list[tuple[str, Any]] = [
        ("prompt", rng.choice([None, 1.5, {"a": 1}, True, b"raw"])),
        ("prompt", [1, "x"]),
        ("prompt", [1, 2**40]),
        ("prompt", [-1]),
        ("prompt", [[1, 2]]),
        ("max_tokens", "many"),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 1.5),
        ("stream", "yes"),
        ("ignore_eos", 1),
        ("v", "1"),
        ("sampling", []),
        ("sampling", {"temperature": {"a": [1, 2]}}),
        ("type", "completions"),
        ("type", 5),
    ]
    for field, value in wrong_types:
        readable(f"{field}={value!r:.40}", "bad_request", field, **{field: value})
    for field, value in BAD_SAMPLING:
        readable(f"sampling {field}={value!r:.40}", "bad_request", field, sampling={field: value})
    readable("empty prompt ids", "bad_request", "prompt", prompt=[])
    readable("token id past the vocabulary", "bad_request", "token id", prompt=[2, 5000])
    readable("huge max_tokens", "context_length", "max_tokens", max_tokens=2**64 - 1)
    readable("another protocol version", "version", "version", v=2)
    rid = rng.randint(0, 1000)
    frame = encoded({"type": "chat", "id": rid, "max_tokens": 2})
    cases.append(Case("chat without messages", [frame], "bad_request", (rid,), "messages"))
    for messages, names in [
        ("hi", "messages"),
        ([], "message"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": "hi", "nom": "x"}], "nom"),
        ([{"role": 1, "content": "hi"}], "role"),
    ]:
        rid = rng.randint(0, 1000)
        message = {"type": "chat", "id": rid, "messages": messages, "max_tokens": 2}
        cases.append(Case(f"chat {messages!r}", [encoded(message)], "bad_request", (rid,), names))
    for sampling in EXTREME_SAMPLING:
        rid = rng.randint(0, 1000)
        message = completion(rid, max_tokens=3, sampling=sampling)
        cases.append(Case(f"extreme sampling {sampling}", [encoded(message)], None, (rid,)))
    # Undecodable inside: text that is not UTF-8, nesting deeper than any decoder recurses.
    rid = rng.randint(0, 1000)
    frame = encoded(completion(rid, prompt="ZZZZ")).replace(b"\xa4ZZZZ", b"\xa4\xff\xfe\xc0\x80")
    cases.append(Case("text not UTF-8", [frame], "bad_request", (None, rid)))
    cases.append(Case("not UTF-8 at the top", [b"\xa2\xff\xfe"], "bad_request"))
    cases.append(Case("deep nesting", [b"\x91" * 3000 + b"\x01"], "bad_request"))
    rid = rng.randint(0, 1000)
    frame = encoded(completion(rid, prompt="ZZZZ")).replace(b"\xa4ZZZZ", b"\x91" * 3000 + b"\x01")
    cases.append(Case("deep nesting inside", [frame], "bad_request", (None, rid)))
    cases.append(Case("truncated", [encoded(completion(5))[:-3]], "bad_request"))
    cases.append(
        Case("trailing bytes", [encoded(completion(5)) + b"\x00"], "bad_request", (None, 5))
    )
    cases.append(Case("an ext value", [b"\xd4\x01\x00"], "bad_request"))
    for n in (2, 3):
        frames = [encoded({"type": "health", "id": 1})] * n
        cases.append(Case(f"{n} frames", frames, "bad_request", names="frame"))
    cases.append(Case("2 empty frames", [b"", b""], "bad_request", names="frame"))
    # Over the size limit, readable or not.
    rid = rng.randint(0, 1000)
    big = encoded(completion(rid, prompt="a" * (MESSAGE_LIMIT + 100)))
    cases.append(Case("over the limit", [big], "too_large", (rid,), str(MESSAGE_LIMIT)))
    cases.append(Case("random bytes over the limit", [rng.randbytes(6000)], "too_large", (None,)))
    cases.append(Case("deep nesting over the limit", [b"\x91" * 6000 + b"\x01"], "too_large"))
    # Valid messages that get no reply: a cancel of nothing.
    cases.append(Case("cancel of nothing", [encoded({"type": "cancel", "id": 99})], "none"))
    rng.shuffle(cases)
    return cases


def check_reply(case: Case, reply: protocol.ServerReply) -> None:
    """The reply is the one `case` expects."""
    label = f"{case.what}: {reply!r:.300}"
    assert reply.id in case.ids, label
    if case.code is None:
        assert isinstance(reply, protocol.Done) or (
            isinstance(reply, protocol.Error) and reply.code == "internal"
        ), label
        return
    assert isinstance(reply, protocol.Error), label
    assert reply.code == case.code, label
    if case.names is not None:
        assert case.names in reply.message, label


def test_malformed_messages_get_errors_and_crash_nothing(
    server: ServeProcess, engine: Engine
) -> None:
    before = server.health()
    assert before.ok
    with RawDealer(server.endpoint) as dealer:
        for case in fuzz_cases(random.Random(1234)):
            if case.code == "none":
                dealer.send(*case.frames)
                assert dealer.receive(0.3) is None, case.what
            else:
                check_reply(case, dealer.exchange(*case.frames))
        assert dealer.receive(0.3) is None  # nothing more than one reply each
    # Far over the limit: the connection is dropped before the message is read whole.
    with RawDealer(server.endpoint) as dealer:
        dealer.send(b"\x00" * (8 * MESSAGE_LIMIT))
        assert dealer.receive(0.5) is None
    assert server.process is not None and server.process.poll() is None
    after = server.health()
    assert after.ok and after.requests_in_flight == 0
    assert [(w.pid, w.restarts) for w in after.workers] == [
        (w.pid, w.restarts) for w in before.workers
    ]
    with server.client() as client:
        assert client.info().max_message_bytes == MESSAGE_LIMIT
        result = client.complete("Hello", 16, temperature=0, ignore_eos=True)
    assert list(result.token_ids) == engine.generate(
        engine.tokenizer.encode("Hello"), 16, stop_tokens=()
    )


# --- 5. errors, cancels, queues ---------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), BAD_SAMPLING)
def test_invalid_sampling_is_a_bad_request_naming_it(
    server: ServeProcess, field: str, value: Any
) -> None:
    with RawDealer(server.endpoint) as dealer:
        reply = dealer.exchange(encoded(completion(41, sampling={field: value})))
    assert isinstance(reply, protocol.Error) and reply.id == 41
    assert reply.code == "bad_request"
    assert field in reply.message


def test_requests_that_do_not_fit_are_refused(server: ServeProcess) -> None:
    with server.client() as client:
        with pytest.raises(ServerError, match="context") as error:
            client.complete(list(range(2, 2 + N_CTX + 1)), 1)
        assert error.value.code == "context_length"
        with pytest.raises(ServerError, match="context") as error:
            client.complete("a" * 400, 1)  # a token per character, and BOS
        assert error.value.code == "context_length"
        with pytest.raises(ServerError, match="max_tokens") as error:
            client.complete("Hello", N_CTX)
        assert error.value.code == "context_length"
        with pytest.raises(ServerError, match="token id 660") as error:
            client.complete([2, 660], 1)
        assert error.value.code == "bad_request"
        # What fits exactly is served.
        ids = list(range(2, 2 + N_CTX - 4))
        result = client.complete(ids, 5, ignore_eos=True)
        assert result.completion_tokens == 5
        assert client.health().requests_in_flight == 0


def test_cancelled_streams_stop_on_the_server(long_server: ServeProcess, engine: Engine) -> None:
    server = long_server
    with server.client() as client:
        s = client.stream("Hello", LONG, temperature=0, ignore_eos=True)
        for _ in zip(range(3), s, strict=False):
            pass
        s.cancel()
        assert s.cancelled
        server.wait_idle()
        server.assert_decode_idle()

        with client.stream("Hello", LONG, temperature=0, ignore_eos=True) as s:
            for _ in s:
                break
        server.wait_idle()
        server.assert_decode_idle()

        s = client.stream("Hello", LONG, temperature=0, ignore_eos=True)
        next(s)
        del s  # left without a cancel: collected, it cancels
        server.wait_idle()
        server.assert_decode_idle()

        result = client.complete("Hello", 8, temperature=0, ignore_eos=True)
    expected = engine.generate(engine.tokenizer.encode("Hello"), 8, stop_tokens=())
    assert list(result.token_ids) == expected


def test_clients_that_go_away_leave_nothing_running(long_server: ServeProcess) -> None:
    server = long_server
    before = server.health()
    client = server.client()
    s = client.stream("Hello", LONG, temperature=0, ignore_eos=True)
    next(s)
    client.close()  # sends a cancel for what is in flight
    server.wait_idle()
    server.assert_decode_idle()
    # A peer that vanishes without a word, with several streams in flight.
    with RawDealer(server.endpoint) as dealer:
        for rid in range(4):
            message = completion(rid, max_tokens=LONG, stream=True, ignore_eos=True)
            dealer.send(encoded(message))
        for _ in range(8):
            assert isinstance(dealer.receive(), protocol.Chunk)
    server.wait_idle()
    server.assert_decode_idle()
    after = server.health()
    assert after.ok
    assert [w.pid for w in after.workers] == [w.pid for w in before.workers]
    with server.client() as client:
        assert client.complete("Hello", 4).completion_tokens >= 1


def test_a_request_id_in_flight_is_refused_and_a_cancel_ends_it(long_server: ServeProcess) -> None:
    server = long_server
    with RawDealer(server.endpoint) as dealer:
        dealer.send(encoded(completion(7, max_tokens=LONG, stream=True, ignore_eos=True)))
        assert isinstance(dealer.receive(), protocol.Chunk)
        dealer.send(encoded(completion(7)))
        reply = dealer.next_ending()
        assert isinstance(reply, protocol.Error) and reply.id == 7
        assert reply.code == "bad_request" and "in flight" in reply.message
        dealer.send(encoded({"type": "cancel", "id": 7}))
        assert dealer.next_ending() == protocol.Cancelled(id=7)
        assert dealer.receive(0.3) is None  # nothing after the end
    server.wait_idle()
    server.assert_decode_idle()


def test_a_full_queue_answers_busy_at_once(
    demo_model_file: Path, tmp_path: Path, engine: Engine
) -> None:
    with ServeProcess.running(
        demo_model_file, tmp_path, "--threads", "1", "--max-pending", "2"
    ) as server:

        async def check() -> None:
            async with AsyncClient(server.endpoint, timeout=30) as client:
                streams = [
                    client.stream("Hello", LONG, temperature=0, ignore_eos=True) for _ in range(2)
                ]
                for s in streams:
                    await s.__anext__()
                refused = await asyncio.gather(
                    *(client.complete("Hello", 4, timeout=5) for _ in range(3)),
                    return_exceptions=True,
                )
                assert all(isinstance(r, ServerBusyError) for r in refused), refused
                for s in streams:
                    await s.__anext__()  # still generating
                    await s.cancel()
            server.wait_idle()
            async with AsyncClient(server.endpoint, timeout=30) as client:
                result = await client.complete("Hello", 8, temperature=0, ignore_eos=True)
            expected = engine.generate(engine.tokenizer.encode("Hello"), 8, stop_tokens=())
            assert list(result.token_ids) == expected

        run(check())


def test_a_tiny_kv_pool_queues_requests_and_refuses_what_never_fits(
    demo_model_file: Path, tmp_path: Path, engine: Engine
) -> None:
    with ServeProcess.running(
        demo_model_file, tmp_path, "--threads", "1", "--kv-tokens", "64", "--max-batch", "4"
    ) as server:
        prompts = ["Hello", "Once upon a time", "yes", "The quick brown fox"]

        async def check() -> None:
            async with AsyncClient(server.endpoint, timeout=60) as client:
                jobs = [(prompts[i % len(prompts)], 8 + i) for i in range(16)]
                results = await asyncio.gather(
                    *(client.complete(p, n, temperature=0, ignore_eos=True) for p, n in jobs)
                )
                for (p, n), result in zip(jobs, results, strict=True):
                    expected = engine.generate(engine.tokenizer.encode(p), n, stop_tokens=())
                    assert list(result.token_ids) == expected
                # The context defaults to what the pool holds: 64 positions.
                with pytest.raises(ServerError, match="context of 64") as error:
                    await client.complete("Hello", 100)
                assert error.value.code == "context_length"

        run(check())
        server.wait_idle()


# --- 6. stopping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "Ctrl-C"],
)
def test_a_signal_stops_everything_and_leaves_nothing(
    demo_model_file: Path, tmp_path: Path, sig: signal.Signals, group: bool
) -> None:
    server = ServeProcess(demo_model_file, tmp_path, free_tcp_endpoint(), ("--threads", "1"))
    server.start()
    try:
        assert server.sockets()
        workers = server.workers()
        assert len(workers) == 2
        with server.client(timeout=5) as client:
            s = client.stream("Hello", 2000, ignore_eos=True)
            next(s)  # stopped with a request in flight
            assert server.stop(sig, group) == 0
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    server.assert_left_nothing()
    assert "stopped" in server.stderr_path.read_text()


def test_a_killed_server_leaves_nothing_behind(demo_model_file: Path, tmp_path: Path) -> None:
    # SIGKILL gives the server no chance to clean up: its workers must notice and exit, and
    # no socket or shared memory may outlive them.
    server = ServeProcess(demo_model_file, tmp_path, free_tcp_endpoint(), ("--threads", "1"))
    server.start()
    assert server.sockets() and len(server.live_workers()) == 2
    server.stop(signal.SIGKILL)
    wait_until(lambda: not server.live_workers(), 5.0, "every worker exited")
    server.assert_left_nothing()


@pytest.mark.parametrize("kind", ["not GGUF", "missing"])
def test_serving_a_bad_model_path_is_an_error_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.gguf"
    if kind == "not GGUF":
        path.write_text("hello, I am not a model\n")
    result = run_serve(path, "--endpoint", free_tcp_endpoint(), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error:") or "\nerror:" in result.stderr, result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_serving_on_a_taken_tcp_endpoint_is_an_error_line(
    demo_model_file: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        result = run_serve(demo_model_file, "--endpoint", endpoint, cwd=tmp_path)
    assert result.returncode == 1
    assert "error:" in result.stderr and endpoint in result.stderr, result.stderr
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_serving_on_the_ipc_endpoint_of_a_running_server_is_an_error_line(
    long_server: ServeProcess, tmp_path: Path
) -> None:
    result = run_serve(
        long_server.model, "--endpoint", long_server.endpoint, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 1
    assert "error:" in result.stderr and long_server.endpoint in result.stderr, result.stderr
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert long_server.health().ok  # still reachable where it was


def test_a_stale_ipc_socket_file_does_not_stop_a_server(
    demo_model_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(path))  # closed without unlinking: what a killed server leaves
    assert path.exists()
    with ServeProcess.running(
        demo_model_file, tmp_path, "--threads", "1", endpoint=f"ipc://{path}"
    ) as server:
        assert server.health().ok


def keygen(directory: Path, name: str) -> None:
    """Make a key pair with the `pygemma4 keygen` command."""
    result = subprocess.run(
        [sys.executable, "-m", "pygemma4", "keygen", str(directory), name],
        capture_output=True,
        text=True,
        cwd=directory.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (directory / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600


def test_curve_admits_only_clients_with_admitted_keys(
    demo_model_file: Path, tmp_path: Path
) -> None:
    keys, admitted = tmp_path / "keys", tmp_path / "admitted"
    for name in ("server", "alice", "mallory"):
        keygen(keys, name)
    admitted.mkdir()
    shutil.copy(keys / "alice.key", admitted)
    alice = {"curve_secret_key": keys / "alice.key_secret", "curve_server_key": keys / "server.key"}
    curve_args = ("--curve-secret-key", str(keys / "server.key_secret"))
    with ServeProcess.running(
        demo_model_file,
        tmp_path,
        "--threads",
        "1",
        *curve_args,
        "--curve-clients",
        str(admitted),
        client_options=alice,
    ) as server:
        with server.client(timeout=10) as client:
            assert client.complete("Hello", 4, temperature=0).completion_tokens == 4
        mallory = {**alice, "curve_secret_key": keys / "mallory.key_secret"}
        for options in ({}, mallory):
            with (
                Client(server.endpoint, timeout=1, **options) as stranger,
                pytest.raises(RequestTimeoutError),
            ):
                stranger.info()
        assert server.health().ok
    result = run_serve(demo_model_file, *curve_args, cwd=tmp_path)
    assert result.returncode == 2 and "go together" in result.stderr
    nobody = str(keys / "nobody.key_secret")
    missing = ("--curve-secret-key", nobody, "--curve-clients", str(admitted))
    result = run_serve(demo_model_file, "--endpoint", free_tcp_endpoint(), *missing, cwd=tmp_path)
    assert result.returncode == 1 and "no such key file" in result.stderr, result.stderr
