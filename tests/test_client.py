"""The client without a server: arguments are checked before anything is sent, requests to an
endpoint where nothing answers time out (and are cancelled), closing is idempotent and both
clients work as context managers.

Where a test must see what the client sent, it binds a ROUTER socket that only receives; the
end-to-end behaviour against a real server is tested with the server."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import zmq
from serve_helpers import ServeProcess

import pygemma4
from pygemma4 import protocol
from pygemma4.chat_output import parse_chat_output
from pygemma4.client import (
    DEFAULT_ENDPOINT,
    AsyncClient,
    Client,
    ClientClosedError,
    RequestTimeoutError,
    ServerBusyError,
    ServerError,
    WorkerFailedError,
)
from pygemma4.curve import CurveKeyError, create_keypair
from pygemma4.errors import Gemma4Error, SamplingParamsError
from pygemma4.protocol import ChatMessage
from pygemma4.tokenizer import Tokenizer
from pygemma4.workers.tokenizer import chat_template_input

SHORT = 0.3  # seconds: the timeout of requests that nothing answers


class Sink:
    """A ROUTER that receives what clients send and never answers."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"

    def received(self, quiet: float = 0.3) -> list[protocol.ClientRequest]:
        """Every message received until none came for `quiet` seconds."""
        messages = []
        while self.router.poll(int(quiet * 1000)):
            _identity, frame = self.router.recv_multipart()
            messages.append(protocol.decode_request(frame))
        return messages

    def close(self) -> None:
        self.router.close()
        self.context.term()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


@pytest.fixture
def unused_endpoint() -> str:
    """A loopback endpoint where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# --- argument checks -------------------------------------------------------------------------

BAD_SAMPLING: list[tuple[dict[str, Any], str]] = [
    ({"temprature": 0.5}, "temprature"),
    ({"stream": True}, "stream"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": 21}, "logprobs"),
]

BAD_PROMPTS = [
    (b"bytes", TypeError, "prompt"),
    (None, TypeError, "prompt"),
    (5, TypeError, "prompt"),
    ({"text": "hi"}, TypeError, "prompt"),
    ({1, 2}, TypeError, "prompt"),
    ([], ValueError, "prompt"),
    ([1, "2"], TypeError, r"prompt\[1\]"),
    ([1, True], TypeError, r"prompt\[1\]"),
    ([1, 2.0], TypeError, r"prompt\[1\]"),
    ([3, -1], ValueError, r"prompt\[1\]"),
    ([2**31], ValueError, r"prompt\[0\]"),
    ("\ud800", ValueError, "Unicode"),
]

BAD_MESSAGES = [
    ("hello", TypeError, "messages"),
    ({"role": "user", "content": "hi"}, TypeError, "messages"),
    (ChatMessage(role="user", content="hi"), TypeError, "messages"),
    (None, TypeError, "messages"),
    ([], ValueError, "empty"),
    ([{"role": "user", "content": "hi"}, "hi"], TypeError, r"messages\[1\]"),
    ([{"role": "user"}], ValueError, r"messages\[0\].*'content'"),
    ([{"content": "hi"}], ValueError, r"messages\[0\].*'role'"),
    ([{"role": "user", "content": "hi", "nom": "x"}], ValueError, r"messages\[0\].*'nom'"),
    ([{"role": "user", "content": ["hi"]}], TypeError, r"messages\[0\] content"),
    ([{"role": "user", "content": [{"type": "image"}]}], ValueError, r"messages\[0\].*image"),
    ([{"role": "user", "content": None}], ValueError, r"messages\[0\].*'content'"),
    (
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}],
        ValueError,
        r"messages\[0\].*arguments",
    ),
    (
        [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "bad name", "arguments": "{}"}}],
            }
        ],
        ValueError,
        r"messages\[0\].*name",
    ),
    (
        [{"role": "tool", "content": "1", "tool_call_id": 5}],
        ValueError,
        r"messages\[0\].*tool_call_id",
    ),
    ([{"role": 1, "content": "hi"}], TypeError, r"messages\[0\] role"),
    ([{"role": "", "content": "hi"}], ValueError, r"messages\[0\]"),
    ([ChatMessage(role="user", content=3)], TypeError, r"messages\[0\] content"),  # type: ignore[arg-type]
]

BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"max_tokens": 0}, ValueError, "max_tokens"),
    ({"max_tokens": 2.0}, ValueError, "max_tokens"),
    ({"max_tokens": True}, ValueError, "max_tokens"),
    ({"ignore_eos": 1}, TypeError, "ignore_eos"),
    ({"timeout": 0}, ValueError, "timeout"),
    ({"timeout": -1.0}, ValueError, "timeout"),
    ({"timeout": float("nan")}, ValueError, "timeout"),
    ({"timeout": float("inf")}, ValueError, "timeout"),
    ({"timeout": "1"}, ValueError, "timeout"),
]


BAD_CHAT_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"tools": {"type": "function"}}, TypeError, "tools"),
    ({"tools": [{"type": "function"}]}, ValueError, r"tools\[0\].*function"),
    (
        {"tools": [{"function": {"name": "f", "parameters": 3}}]},
        ValueError,
        r"tools\[0\].*parameters",
    ),
    (
        {"tools": [{"type": "retrieval", "function": {"name": "f"}}]},
        ValueError,
        r"tools\[0\].*type",
    ),
    ({"tools": [{"function": {"name": ""}}]}, ValueError, r"tools\[0\].*name"),
    ({"chat_template_kwargs": ["enable_thinking"]}, TypeError, "chat_template_kwargs"),
    ({"chat_template_kwargs": {1: True}}, TypeError, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"x": object()}}, ValueError, "chat_template_kwargs"),
    ({"raw_text": 1}, TypeError, "raw_text"),
]


def async_calls(client: AsyncClient) -> dict[str, Callable[..., Any]]:
    """Each generation method as f(prompt or messages, **kwargs) -> awaitable; the streams are
    read to their first chunk."""

    async def first_chunk(stream: Any) -> Any:
        return await stream.__anext__()

    return {
        "complete": client.complete,
        "chat": client.chat,
        "stream": lambda p, **kw: first_chunk(client.stream(p, **kw)),
        "stream_chat": lambda m, **kw: first_chunk(client.stream_chat(m, **kw)),
    }


def prompt_for(method: str) -> Any:
    return [{"role": "user", "content": "hi"}] if "chat" in method else "hi"


def expect_nothing_sent(sink: Sink, client: Client) -> None:
    """Only a probe `health` request reaches the sink: nothing before it was sent."""
    with pytest.raises(RequestTimeoutError):
        client.health(timeout=0.05)
    assert [type(m) for m in sink.received()] == [protocol.Health]


def bad_calls(method: str) -> list[tuple[Any, dict[str, Any], type[Exception], str]]:
    """(prompt or messages, keyword arguments, error, what its message matches) for every bad
    call of `method`."""
    first = prompt_for(method)
    bad_first = BAD_MESSAGES if "chat" in method else BAD_PROMPTS
    return [
        *((first, sampling, SamplingParamsError, name) for sampling, name in BAD_SAMPLING),
        *((first, options, error, match) for options, error, match in BAD_OPTIONS),
        *((value, {}, error, match) for value, error, match in bad_first),
        *(
            (first, options, error, match)
            for options, error, match in BAD_CHAT_OPTIONS
            if "chat" in method
        ),
    ]


@pytest.mark.parametrize("method", ["complete", "chat", "stream", "stream_chat"])
def test_bad_arguments_are_refused_before_sending(sink: Sink, method: str) -> None:
    client = AsyncClient(sink.endpoint, timeout=SHORT)

    async def attempts() -> None:
        call = async_calls(client)[method]
        for first, kwargs, error, match in bad_calls(method):
            with pytest.raises(error, match=match):
                await call(first, **kwargs)
        with pytest.raises(RequestTimeoutError):
            await client.health(timeout=0.05)
        await client.close()

    run(attempts())
    assert [type(m) for m in sink.received()] == [protocol.Health]


def test_streams_check_their_arguments_when_created() -> None:
    client = AsyncClient(timeout=SHORT)
    with pytest.raises(SamplingParamsError, match="temperature"):
        client.stream("hi", temperature=-1)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        client.stream_chat([{"role": "user"}])
    run(client.close())


def test_sync_client_refuses_bad_arguments_before_sending(sink: Sink) -> None:
    with Client(sink.endpoint, timeout=SHORT) as client:
        with pytest.raises(SamplingParamsError, match="unknown sampling parameter 'temp'"):
            client.complete("hi", temp=0)
        with pytest.raises(TypeError, match=r"prompt\[0\]"):
            client.stream(["1"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match=r"messages\[0\]"):
            client.chat([{"role": "user", "content": "hi", "extra": 1}])  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="max_tokens"):
            client.stream_chat([{"role": "user", "content": "hi"}], 0)
        expect_nothing_sent(sink, client)


def test_constructor_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="endpoint"):
        AsyncClient(5555)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonsense"):
        AsyncClient("nonsense")
    with pytest.raises(ValueError, match="timeout"):
        AsyncClient(timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        Client(timeout=-1)
    unlimited = AsyncClient(timeout=None)
    assert unlimited.timeout is None
    run(unlimited.close())
    client = Client()
    assert (client.endpoint, client.timeout) == (DEFAULT_ENDPOINT, 60.0)
    client.close()


# --- what is sent ----------------------------------------------------------------------------


def test_requests_carry_their_arguments_and_a_timeout_cancels(sink: Sink) -> None:
    client = AsyncClient(sink.endpoint, timeout=SHORT)

    async def requests() -> None:
        with pytest.raises(RequestTimeoutError):
            await client.complete(
                np.array([2, 5, 7]),  # type: ignore[arg-type]  # any iterable of ids works
                4,
                ignore_eos=True,
                temperature=0,
                stop="\n",
                seed=3,
            )
        with pytest.raises(RequestTimeoutError):
            async for _ in client.stream_chat(
                [ChatMessage(role="system", content="be brief"), {"role": "user", "content": "hi"}]
            ):
                pass
        with pytest.raises(RequestTimeoutError):
            await client.chat(
                TOOL_CONVERSATION,
                tools=[WEATHER_TOOL],
                chat_template_kwargs={"enable_thinking": True},
                raw_text=True,
            )
        await client.close()

    run(requests())
    completion, cancel_completion, chat, cancel_chat, tool_chat, _ = sink.received()
    assert isinstance(tool_chat, protocol.Chat)
    assert tool_chat.raw_text and tool_chat.chat_template_kwargs == {"enable_thinking": True}
    assert tool_chat.tools == [msgspec.convert(WEATHER_TOOL, protocol.ToolDefinition)]
    assert tool_chat.messages == [msgspec.convert(m, ChatMessage) for m in TOOL_CONVERSATION]
    assert tool_chat.messages[2].tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert isinstance(completion, protocol.Completion)
    assert completion.prompt == [2, 5, 7]
    assert (completion.max_tokens, completion.ignore_eos, completion.stream) == (4, True, False)
    assert protocol.sampling_params(completion.sampling) == pygemma4.SamplingParams(
        temperature=0, stop=("\n",), seed=3
    )
    assert isinstance(chat, protocol.Chat)
    assert chat.stream and chat.max_tokens is None
    assert chat.messages == [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="hi"),
    ]
    assert protocol.sampling_params(chat.sampling) == pygemma4.SamplingParams()
    assert cancel_completion == protocol.Cancel(id=completion.id)
    assert cancel_chat == protocol.Cancel(id=chat.id)
    assert completion.id != chat.id


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "developer", "content": "Use tools."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Ask the tool.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
]


def test_a_stream_cancelled_before_it_is_read_sends_nothing(sink: Sink) -> None:
    with Client(sink.endpoint, timeout=SHORT) as client:
        stream = client.stream("hi")
        stream.cancel()
        assert list(stream) == []
        assert stream.cancelled and stream.finished and stream.result is None
        expect_nothing_sent(sink, client)


# --- timeouts --------------------------------------------------------------------------------


def test_nothing_listening_times_out(unused_endpoint: str) -> None:
    async def requests() -> list[tuple[RequestTimeoutError, float]]:
        outcomes = []
        async with AsyncClient(unused_endpoint, timeout=SHORT) as client:
            for call in (
                lambda: client.complete("hi"),
                lambda: client.stream("hi").__anext__(),
                lambda: client.chat([{"role": "user", "content": "hi"}]),
                client.info,
                client.health,
            ):
                start = time.monotonic()
                with pytest.raises(RequestTimeoutError) as caught:
                    await call()
                outcomes.append((caught.value, time.monotonic() - start))
        return outcomes

    for error, elapsed in run(requests()):
        assert SHORT <= elapsed < SHORT + 1.0
        assert (error.endpoint, error.timeout) == (unused_endpoint, SHORT)
        assert isinstance(error, TimeoutError) and isinstance(error, Gemma4Error)
        assert unused_endpoint in str(error) and "0.3 s" in str(error)


def test_a_timeout_given_per_call_overrides_the_clients(unused_endpoint: str) -> None:
    async def request() -> float:
        async with AsyncClient(unused_endpoint, timeout=60) as client:
            start = time.monotonic()
            with pytest.raises(RequestTimeoutError, match="0.1 s"):
                await client.complete("hi", timeout=0.1)
            return time.monotonic() - start

    assert run(request()) < 1.0


def test_many_requests_at_once_time_out_together(unused_endpoint: str) -> None:
    async def requests() -> list[BaseException | Any]:
        async with AsyncClient(unused_endpoint, timeout=SHORT) as client:
            return await asyncio.gather(
                *(client.complete(f"prompt {i}") for i in range(50)), return_exceptions=True
            )

    start = time.monotonic()
    outcomes = run(requests())
    assert time.monotonic() - start < SHORT + 1.0
    assert all(isinstance(outcome, RequestTimeoutError) for outcome in outcomes)


def test_sync_client_times_out_from_many_threads(unused_endpoint: str) -> None:
    errors: list[BaseException] = []

    def request(client: Client, i: int) -> None:
        try:
            if i % 2:
                client.complete("hi")
            else:
                next(iter(client.stream("hi")))
        except BaseException as e:
            errors.append(e)

    start = time.monotonic()
    with Client(unused_endpoint, timeout=SHORT) as client:
        threads = [threading.Thread(target=request, args=(client, i)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert time.monotonic() - start < SHORT + 1.5
    assert len(errors) == 8
    assert all(isinstance(e, RequestTimeoutError) for e in errors)


# --- closing ---------------------------------------------------------------------------------


def test_async_close_is_idempotent_and_ends_requests(unused_endpoint: str) -> None:
    async def session() -> None:
        client = AsyncClient(unused_endpoint, timeout=None)
        pending = asyncio.ensure_future(client.complete("hi"))
        await asyncio.sleep(0.05)
        await client.close()
        assert client.closed
        with pytest.raises(ClientClosedError):
            await pending
        await client.close()
        with pytest.raises(ClientClosedError):
            await client.info()
        with pytest.raises(ClientClosedError):
            await client.stream("hi").__anext__()

    run(session())


def test_an_async_client_that_never_ran_closes() -> None:
    client = AsyncClient()
    run(client.close())
    run(client.close())
    assert client.closed


def test_sync_client_as_context_manager(unused_endpoint: str) -> None:
    with Client(unused_endpoint, timeout=SHORT) as client:
        assert not client.closed
        with pytest.raises(RequestTimeoutError):
            client.info()
    assert client.closed
    client.close()
    with pytest.raises(ClientClosedError):
        client.health()
    with pytest.raises(ClientClosedError):
        next(client.stream("hi"))


def test_sync_close_ends_requests_of_other_threads(unused_endpoint: str) -> None:
    client = Client(unused_endpoint, timeout=None)
    errors: list[BaseException] = []

    def request() -> None:
        try:
            client.complete("hi")
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(0.1)
    client.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ClientClosedError)
    client.close()


def test_sync_client_leaves_no_thread_behind() -> None:
    before = threading.active_count()
    for _ in range(5):
        with Client():
            pass
    assert threading.active_count() == before


# --- errors and exports ----------------------------------------------------------------------


def test_server_errors() -> None:
    error = ServerBusyError("busy", "server busy: 256 requests in flight")
    assert str(error) == "busy: server busy: 256 requests in flight"
    assert (error.code, error.message) == ("busy", "server busy: 256 requests in flight")
    assert isinstance(error, ServerError) and isinstance(error, Gemma4Error)
    assert issubclass(WorkerFailedError, ServerError)


def test_exported_lazily_without_the_compiled_core() -> None:
    assert pygemma4.Client is Client and pygemma4.AsyncClient is AsyncClient
    code = (
        "import sys, pygemma4; assert 'zmq' not in sys.modules; "
        "from pygemma4 import Client; import pygemma4.client; "
        "assert 'pygemma4._core' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_curve_keys_are_checked_before_connecting(tmp_path: Path, unused_endpoint: str) -> None:
    public, secret = create_keypair(tmp_path, "alice")
    assert secret.stat().st_mode & 0o777 == 0o600 and public.stat().st_mode & 0o777 == 0o644
    with pytest.raises(CurveKeyError, match="exists already"):
        create_keypair(tmp_path, "alice")
    with pytest.raises(ValueError, match="go together"):
        Client(unused_endpoint, curve_secret_key=secret)
    with pytest.raises(CurveKeyError, match="no secret key"):
        Client(unused_endpoint, curve_secret_key=public, curve_server_key=public)
    with pytest.raises(CurveKeyError, match="no such key file"):
        Client(unused_endpoint, curve_secret_key=secret, curve_server_key=tmp_path / "server.key")
    (tmp_path / "junk.key").write_text("not a key\n")
    with pytest.raises(CurveKeyError, match="not a CURVE key file"):
        Client(unused_endpoint, curve_secret_key=secret, curve_server_key=tmp_path / "junk.key")


# --- tools and reasoning on a real server -----------------------------------------------------

OFFICIAL_TEMPLATE = (
    Path(__file__).resolve().parents[2] / "shared" / "templates" / "gemma4-small-2026-07-09.jinja"
)


@pytest.fixture(scope="module")
def tool_server(
    demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServeProcess, Tokenizer]]:
    """A server of the demo model carrying Google's Gemma 4 chat template, which declares tools."""
    if not OFFICIAL_TEMPLATE.is_file():
        pytest.skip(f"the official chat template is not at {OFFICIAL_TEMPLATE}")
    from conftest import rewrite_gguf

    workdir = tmp_path_factory.mktemp("tools")
    model = rewrite_gguf(
        demo_model_file,
        workdir / "demo-official-template.gguf",
        {"tokenizer.chat_template": OFFICIAL_TEMPLATE.read_text()},
    )
    with ServeProcess.running(model, workdir, "--threads", "1") as server:
        yield server, Tokenizer.from_gguf(model)


def expected_prompt(tokenizer: Tokenizer, thinking: bool) -> list[int]:
    request = protocol.Chat(
        id=0,
        messages=[msgspec.convert(m, ChatMessage) for m in TOOL_CONVERSATION],
        tools=[msgspec.convert(WEATHER_TOOL, protocol.ToolDefinition)],
        chat_template_kwargs={"enable_thinking": thinking},
    )
    messages, variables = chat_template_input(request)
    return tokenizer.encode_chat(messages, **variables)


def test_tools_and_template_kwargs_reach_the_template(
    tool_server: tuple[ServeProcess, Tokenizer],
) -> None:
    server, tokenizer = tool_server
    with server.client() as client:
        for thinking in (False, True):
            result = client.chat(
                TOOL_CONVERSATION,
                6,
                tools=[WEATHER_TOOL],
                chat_template_kwargs={"enable_thinking": thinking},
                temperature=0,
            )
            assert result.prompt_tokens == len(expected_prompt(tokenizer, thinking))
        assert expected_prompt(tokenizer, True) != expected_prompt(tokenizer, False)
        without_tools = client.chat(TOOL_CONVERSATION[:2], 1, temperature=0)
        assert without_tools.prompt_tokens < result.prompt_tokens


def test_raw_text_keeps_special_tokens_streamed_and_not(
    tool_server: tuple[ServeProcess, Tokenizer],
) -> None:
    server, tokenizer = tool_server
    kwargs: dict[str, Any] = {"tools": [WEATHER_TOOL], "temperature": 0, "ignore_eos": True}
    with server.client() as client:
        plain = client.chat(TOOL_CONVERSATION, 24, **kwargs)
        raw = client.chat(TOOL_CONVERSATION, 24, raw_text=True, **kwargs)
        stream = client.stream_chat(TOOL_CONVERSATION, 24, raw_text=True, **kwargs)
        streamed = "".join(chunk.text for chunk in stream)
    assert raw.token_ids == plain.token_ids
    assert plain.text == tokenizer.decode(plain.token_ids, skip_special=True)
    assert raw.text == streamed == tokenizer.decode(raw.token_ids)
    assert not raw.in_reasoning  # the demo vocabulary has no channel tokens
    parse_chat_output(raw.text, in_reasoning=raw.in_reasoning)


@pytest.mark.parametrize(
    ("messages", "options", "problem"),
    [
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": "{city"}}],
                }
            ],
            {},
            r"messages\[0\].tool_calls\[0\].function.arguments is not JSON",
        ),
        (TOOL_CONVERSATION, {"chat_template_kwargs": {"tools": []}}, "may not set tools"),
        (
            [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": "[1]"}}],
                }
            ],
            {},
            "is not a JSON object",
        ),
    ],
)
def test_bad_tool_chats_get_a_clear_error_reply(
    tool_server: tuple[ServeProcess, Tokenizer],
    messages: list[dict[str, Any]],
    options: dict[str, Any],
    problem: str,
) -> None:
    server, _ = tool_server
    with server.client() as client:
        with pytest.raises(ServerError, match=problem) as caught:
            client.chat(messages, 1, **options)
        assert caught.value.code == "bad_request"
        assert client.chat(TOOL_CONVERSATION[:2], 1).completion_tokens == 1
