"""What one client may ask of a real `pygemma4 serve`, each limit set on its command line: the
size of a message (ZeroMQ) and of a body (HTTP), the tokens of a prompt, the number and length of
stop strings, logprobs, requests in flight per connection and per HTTP client address, and the
prompt tokens waiting to start. A request past any of them is refused with an error naming the
limit, and the server goes on serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from serve_helpers import RawDealer, ServeProcess, free_port

from pygemma4 import protocol
from pygemma4.client import AsyncClient, ServerBusyError, ServerError

MESSAGE_BYTES = 8192
PROMPT_TOKENS = 40
QUEUED_TOKENS = 50
PER_CLIENT = 2
STOP_STRINGS = 2
STOP_CHARS = 8
LOGPROBS = 3
N_CTX = 4096
LONG = N_CTX - 64
"""max_tokens of a stream that must still run while a test acts."""
LIMIT_ARGS = (
    f"--max-message-bytes {MESSAGE_BYTES} --max-prompt-tokens {PROMPT_TOKENS} "
    f"--max-queued-tokens {QUEUED_TOKENS} --max-pending-per-client {PER_CLIENT} "
    f"--max-stop-strings {STOP_STRINGS} --max-stop-chars {STOP_CHARS} --max-logprobs {LOGPROBS}"
).split()


@pytest.fixture(scope="module")
def server(demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The demo model served with small limits, one sequence at a time (so that requests
    wait), with its HTTP API."""
    listen = f"127.0.0.1:{free_port()}"
    args = ("--threads", "1", "--max-batch", "1", "--n-ctx", str(N_CTX), "--http", listen)
    workdir = tmp_path_factory.mktemp("limits")
    with ServeProcess.running(demo_model_file, workdir, *args, *LIMIT_ARGS) as serve:
        serve.base_url = f"http://{listen}"
        yield serve


def ids(n: int) -> list[int]:
    """A prompt of exactly `n` token ids."""
    return [2] + [100 + i % 200 for i in range(n - 1)]


def still_serves(server: Any) -> None:
    with server.client() as client:
        result = client.complete(ids(4), 2, temperature=0, ignore_eos=True)
    assert result.completion_tokens == 2
    assert server.health().ok


def test_info_carries_the_limits(server: Any) -> None:
    with server.client() as client:
        info = client.info()
    assert info.max_message_bytes == MESSAGE_BYTES
    assert info.limits == protocol.ServeLimits(
        max_pending_per_client=PER_CLIENT,
        max_prompt_tokens=PROMPT_TOKENS,
        max_queued_tokens=QUEUED_TOKENS,
        max_stop_strings=STOP_STRINGS,
        max_stop_chars=STOP_CHARS,
        max_logprobs=LOGPROBS,
    )


@pytest.mark.parametrize(
    ("prompt", "options", "code", "names"),
    [
        (ids(PROMPT_TOKENS + 1), {}, "too_large", f"at most {PROMPT_TOKENS} (--max-prompt-tokens)"),
        ("word " * 200, {}, "too_large", "--max-prompt-tokens"),
        (ids(4), {"stop": ["a", "b", "c"]}, "bad_request", "at most 2 (--max-stop-strings)"),
        (ids(4), {"stop": ["x" * 9]}, "bad_request", "at most 8 (--max-stop-chars)"),
        (ids(4), {"logprobs": 4}, "bad_request", "at most 3 (--max-logprobs)"),
    ],
    ids=["prompt-ids", "prompt-text", "stop-strings", "stop-chars", "logprobs"],
)
def test_requests_past_a_limit_are_refused_naming_it(
    server: Any, prompt: Any, options: dict[str, Any], code: str, names: str
) -> None:
    with server.client() as client, pytest.raises(ServerError) as refused:
        client.complete(prompt, 4, **options)
    assert refused.value.code == code
    assert names in refused.value.message
    # What is within the limits is served.
    with server.client() as client:
        client.complete(ids(PROMPT_TOKENS), 1, stop=["ab"] * STOP_STRINGS, logprobs=LOGPROBS)
    still_serves(server)


def test_chat_prompt_past_the_limit_is_refused(server: Any) -> None:
    with server.client() as client, pytest.raises(ServerError, match="--max-prompt-tokens"):
        client.chat([{"role": "user", "content": "word " * 100}], max_tokens=1)


def test_message_past_the_size_limit_is_refused_naming_it(server: Any) -> None:
    request = {"type": "completion", "id": 7, "prompt": "x" * MESSAGE_BYTES}
    with RawDealer(server.endpoint) as dealer:
        reply = dealer.exchange(msgspec.msgpack.encode(request))
    assert isinstance(reply, protocol.Error) and reply.code == "too_large"
    assert f"limit of {MESSAGE_BYTES} bytes" in reply.message
    still_serves(server)


async def wait_in_flight(client: AsyncClient, n: int) -> None:
    """Until the server holds `n` requests."""
    while (await client.health()).requests_in_flight < n:
        await asyncio.sleep(0.02)


def test_requests_in_flight_per_connection(server: Any) -> None:
    async def check() -> None:
        async with AsyncClient(server.endpoint) as client, AsyncClient(server.endpoint) as other:
            running = client.stream(ids(4), LONG, ignore_eos=True)
            await running.__anext__()
            waiting = asyncio.create_task(client.complete(ids(4), 1, timeout=120))
            await wait_in_flight(other, PER_CLIENT)
            with pytest.raises(ServerBusyError, match="--max-pending-per-client 2"):
                await client.complete(ids(4), 1)
            # Another connection is another client.
            served = asyncio.create_task(other.complete(ids(4), 1, timeout=120))
            await wait_in_flight(other, PER_CLIENT + 1)
            await running.cancel()
            assert (await waiting).finish_reason == "length"
            assert (await served).finish_reason == "length"

    asyncio.run(check())
    still_serves(server)


def test_prompt_tokens_waiting_to_start(server: Any) -> None:
    """With the one batch place taken, prompts wait; past the limit of tokens waiting, a new
    one is refused as busy, naming the limit."""

    async def check() -> None:
        async with (
            AsyncClient(server.endpoint) as a,
            AsyncClient(server.endpoint) as b,
            AsyncClient(server.endpoint) as c,
        ):
            running = a.stream(ids(4), LONG, ignore_eos=True)
            await running.__anext__()
            waiting = asyncio.create_task(b.complete(ids(30), 1, timeout=120))
            await wait_in_flight(c, 2)
            with pytest.raises(ServerBusyError, match=r"limit of 50 \(--max-queued-tokens\)"):
                await c.complete(ids(30), 1)
            # What still fits waits too.
            fits = asyncio.create_task(c.complete(ids(20), 1, timeout=120))
            await wait_in_flight(a, 3)
            await running.cancel()
            assert (await waiting).finish_reason == "length"
            assert (await fits).finish_reason == "length"

    asyncio.run(check())
    still_serves(server)


# --- HTTP -----------------------------------------------------------------------------------


def test_http_body_past_the_limit_is_refused(server: Any) -> None:
    body = {"model": "x", "prompt": "y" * MESSAGE_BYTES}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 413
    assert f"limit of {MESSAGE_BYTES} bytes" in reply.json()["error"]["message"]


def test_http_requests_in_flight_per_client_address(server: Any) -> None:
    """Each client address may have PER_CLIENT requests in flight; the HTTP front end's own
    connection carries more than that from several addresses."""
    model = server.model.name
    request = {"model": model, "prompt": [ids(4)], "max_tokens": LONG, "ignore_eos": True}
    request["stream"] = True
    other = httpx.HTTPTransport(local_address="127.0.0.2")
    # The second address's request takes the one batch place after both streams end: minutes
    # on a slow build (the sanitized core).
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as http,
        httpx.Client(base_url=server.base_url, timeout=600, transport=other) as second,
    ):
        opened = [http.stream("POST", "/v1/completions", json=request) for _ in range(PER_CLIENT)]
        responses = [s.__enter__() for s in opened]
        try:
            for response in responses:
                assert response.status_code == 200
            refused = http.post("/v1/completions", json={**request, "stream": False})
            assert refused.status_code == 429
            assert "--max-pending-per-client 2" in refused.json()["error"]["message"]
            small = {"model": model, "prompt": ids(4), "max_tokens": 2, "ignore_eos": True}
            served = second.post("/v1/completions", json=small)
            assert served.status_code == 200, served.text
        finally:
            for s in opened:
                s.__exit__(None, None, None)
    still_serves(server)


# --- input a library would choke on: answered 400 naming it, never 500 ----------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_http_number_of_more_digits_than_python_converts(server: Any, path: str) -> None:
    body = '{"model": "m", "max_tokens": ' + "9" * 5000 + "}"
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        reply = http.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert "not valid JSON" in reply.json()["error"]["message"]
    assert "digits" in reply.json()["error"]["message"]


def test_http_integer_beyond_64_bits_in_template_kwargs(server: Any) -> None:
    request = {
        "model": server.model.name,
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"depth": 2**64},
        "max_tokens": 1,
    }
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        reply = http.post("/v1/chat/completions", json=request)
    assert reply.status_code == 400, reply.text
    assert "cannot encode the chat" in reply.json()["error"]["message"]


def test_http_tokenize_text_that_is_not_unicode(server: Any) -> None:
    body = '{"prompt": "a\\ud800b"}'
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        reply = http.post("/tokenize", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "prompt" and "not valid Unicode" in error["message"]
