"""The OpenAI-compatible HTTP API end to end: a real `pygemma4 serve` on the demo model with its
HTTP front end on loopback, spoken to by the official `openai` SDK (sync and async) and, for
what the SDK would refuse to send, by raw httpx requests.

What it must do: give the ZeroMQ client's greedy text for the same request; stream what it
answers whole; honour the sampling fields, n, stop and logprobs; refuse every bad request with
the right 4xx in OpenAI's error shape and keep serving; require the API key; count in
/metrics; cancel a request whose client disconnects; report a worker that dies mid-stream as
an error event before [DONE], to every open stream within a second, and serve again after; lose
and mix nothing under 64 concurrent streaming clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from serve_helpers import ServeProcess, free_port, free_tcp_endpoint, wait_until
from test_client import WEATHER_TOOL as TOOL
from test_constraints import with_tool_tokens

from pygemma4.chat_output import parse_chat_output
from pygemma4.curve import create_keypair

API_KEY = "test-key-123"
N_CTX = 8192
LONG = N_CTX - 48
"""max_tokens of a stream that must still run while a test acts (seconds on this model)."""
CHAT = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def server(demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The demo model, with Gemma 4's tool-call tokens in its vocabulary (for forced calls),
    served with its HTTP API (requiring API_KEY) on a free port."""
    model = with_tool_tokens(demo_model_file, tmp_path_factory.mktemp("model") / "demo-tools.gguf")
    listen = f"127.0.0.1:{free_port()}"
    args = ("--threads", "1", "--max-batch", "8", "--n-ctx", str(N_CTX), "--http", listen)
    key_file = tmp_path_factory.mktemp("key") / "api.key"
    key_file.write_text(API_KEY + "\n")
    with ServeProcess.running(
        model, tmp_path_factory.mktemp("serve"), *args, "--api-key-file", str(key_file)
    ) as serve:
        serve.base_url = f"http://{listen}"
        serve.model_name = model.name
        yield serve


@pytest.fixture
def sdk(server: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


@pytest.fixture
def http(server: Any) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as c:
        yield c


def test_models_lists_the_served_model(sdk: openai.OpenAI, server: Any) -> None:
    models = sdk.models.list().data
    assert [m.id for m in models] == [server.model_name]
    assert sdk.models.retrieve(server.model_name).id == server.model_name


def test_greedy_chat_and_completion_equal_the_zeromq_client(
    sdk: openai.OpenAI, server: Any
) -> None:
    with server.client() as zmq:
        chat = zmq.chat(CHAT, 12, temperature=0, raw_text=True)
        completion = zmq.complete([2, 12, 40], 12, temperature=0)
    reply = sdk.chat.completions.create(
        model=server.model_name, messages=CHAT, max_tokens=12, temperature=0
    )
    parsed = parse_chat_output(chat.text, in_reasoning=chat.in_reasoning)
    assert reply.choices[0].message.content == parsed.content
    assert reply.choices[0].message.model_extra["reasoning_content"] == parsed.reasoning
    assert reply.choices[0].finish_reason == chat.finish_reason != "tool_calls"
    assert reply.usage.prompt_tokens == chat.prompt_tokens
    assert reply.usage.completion_tokens == chat.completion_tokens
    assert reply.usage.total_tokens == chat.prompt_tokens + chat.completion_tokens
    text = sdk.completions.create(
        model=server.model_name, prompt=[2, 12, 40], max_tokens=12, temperature=0
    )
    assert text.choices[0].text == completion.text
    assert text.usage.completion_tokens == completion.completion_tokens


def test_streamed_chat_equals_the_whole_reply(sdk: openai.OpenAI, server: Any) -> None:
    whole = sdk.chat.completions.create(
        model=server.model_name, messages=CHAT, max_completion_tokens=10, temperature=0
    )
    chunks = list(
        sdk.chat.completions.create(
            model=server.model_name,
            messages=CHAT,
            max_completion_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_async_sdk_streams_completions_and_chat(server: Any) -> None:
    async def run() -> tuple[str, str, str]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0
        ) as client:
            whole = await client.completions.create(
                model=server.model_name, prompt="Hello", max_tokens=8, temperature=0
            )
            stream = await client.completions.create(
                model=server.model_name, prompt="Hello", max_tokens=8, temperature=0, stream=True
            )
            streamed = "".join([c.choices[0].text async for c in stream])
            chat = await client.chat.completions.create(
                model=server.model_name, messages=CHAT, max_tokens=4, temperature=0
            )
            return whole.choices[0].text, streamed, chat.choices[0].message.content or ""

    whole, streamed, chat = asyncio.run(run())
    assert streamed == whole
    assert chat


def test_n_choices_are_parallel_reproducible_sequences(sdk: openai.OpenAI, server: Any) -> None:
    def ask(stream: bool) -> list[str]:
        fields: dict[str, Any] = dict(
            model=server.model_name, messages=CHAT, max_tokens=8, n=3, seed=7, temperature=1.0
        )
        if not stream:
            reply = sdk.chat.completions.create(**fields)
            assert [c.index for c in reply.choices] == [0, 1, 2]
            assert reply.usage.completion_tokens == 3 * 8
            return [c.message.content or "" for c in reply.choices]
        texts = ["", "", ""]
        for chunk in sdk.chat.completions.create(**fields, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        return texts

    first = ask(stream=False)
    assert first == ask(stream=False) == ask(stream=True)
    assert len(set(first)) > 1, "the choices of one request must differ"


def test_sampling_fields_and_stop(sdk: openai.OpenAI, server: Any) -> None:
    free = sdk.chat.completions.create(
        model=server.model_name, messages=CHAT, max_tokens=16, temperature=0
    ).choices[0]
    stop = free.message.content[3:6]
    stopped = sdk.chat.completions.create(
        model=server.model_name, messages=CHAT, max_tokens=16, temperature=0, stop=[stop, "zzz"]
    ).choices[0]
    assert stopped.finish_reason == "stop"
    # A message's content is given without whitespace at its ends.
    before_stop = free.message.content[: free.message.content.index(stop)]
    assert stopped.message.content == before_stop.rstrip()
    reply = sdk.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "system", "content": "Be brief."}, *CHAT],
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=3,
        stop="qqq",
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert reply.usage.completion_tokens == 6


def test_tools_history_and_template_kwargs_are_taken(sdk: openai.OpenAI, server: Any) -> None:
    """The demo model's own template shows no tools (what Gemma 4's templates make of them is
    the template tests' business): here every field must be accepted and answered."""

    def prompt_tokens(**fields: Any) -> int:
        reply = sdk.chat.completions.create(
            model=server.model_name, max_tokens=1, temperature=0, **fields
        )
        assert reply.usage.completion_tokens == 1
        return reply.usage.prompt_tokens

    plain = prompt_tokens(messages=CHAT)
    assert prompt_tokens(messages=CHAT, tools=[TOOL]) >= plain
    assert prompt_tokens(messages=CHAT, tools=[TOOL], tool_choice="none") == plain
    assert prompt_tokens(messages=CHAT, tools=[TOOL], tool_choice="auto") >= plain
    history = [
        {"role": "developer", "content": "Use the tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    assert prompt_tokens(messages=history, tools=[TOOL]) > plain
    kwargs = {"chat_template_kwargs": {"enable_thinking": True}}
    assert prompt_tokens(messages=CHAT, extra_body=kwargs) >= plain


def test_response_format_constrains_the_reply(sdk: openai.OpenAI, server: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    reply = sdk.chat.completions.create(
        model=server.model_name,
        messages=CHAT,
        max_tokens=60,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    ).choices[0]
    assert reply.finish_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), schema)
    anything = sdk.chat.completions.create(
        model=server.model_name,
        messages=CHAT,
        max_tokens=60,
        seed=2,
        response_format={"type": "json_object"},
    ).choices[0]
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.message.content), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
def test_a_forced_tool_choice_is_a_valid_call(sdk: openai.OpenAI, server: Any, choice: Any) -> None:
    other = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"n": {"type": "integer"}},
                "required": ["n"],
            },
        },
    }
    for seed in range(3):
        reply = sdk.chat.completions.create(
            model=server.model_name,
            messages=CHAT,
            max_tokens=80,
            seed=seed,
            tools=[TOOL, other],
            tool_choice=choice,
        ).choices[0]
        assert reply.finish_reason == "tool_calls", reply
        (call,) = reply.message.tool_calls
        tool = {"get_weather": TOOL, "f": other}[call.function.name]
        if choice != "required":
            assert call.function.name == "f"
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_logprobs_chat_and_completions(sdk: openai.OpenAI, server: Any) -> None:
    with server.client() as zmq:
        raw_text = zmq.chat(CHAT, 5, temperature=0, raw_text=True).text
    chat = sdk.chat.completions.create(
        model=server.model_name,
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    ).choices[0]
    content = chat.logprobs.content
    assert len(content) == 5
    assert all(len(t.top_logprobs) == 3 for t in content)
    # Greedy: the token chosen is the most likely one.
    assert all(t.top_logprobs[0].logprob == t.logprob for t in content)
    raw = b"".join(bytes(t.bytes) for t in content)
    assert raw.decode("utf-8", "replace") == raw_text
    text = sdk.completions.create(
        model=server.model_name, prompt="Hello", max_tokens=4, temperature=0, logprobs=2
    ).choices[0]
    assert len(text.logprobs.tokens) == len(text.logprobs.token_logprobs) == 4
    assert all(len(top) <= 2 for top in text.logprobs.top_logprobs)
    assert text.logprobs.text_offset[0] == 0


def test_tokenize_and_detokenize(http: httpx.Client, server: Any) -> None:
    with server.client() as zmq:
        prompt_tokens = zmq.chat(CHAT, 1, temperature=0).prompt_tokens
    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == N_CTX
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {
        "prompt": "Hello world"
    }
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] == prompt_tokens


def _big_body() -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (5 << 20)}]})


CHAT_PATH = "/v1/chat/completions"
TEXT_PATH = "/v1/completions"


def _chat(**fields: Any) -> dict[str, Any]:
    """A chat request body with `fields` (the model "M" is replaced by the served one)."""
    return {"model": "M", "messages": CHAT, **fields}


def _text(**fields: Any) -> dict[str, Any]:
    """A completions request body with `fields`."""
    return {"model": "M", "prompt": "x", **fields}


def _said(content: Any, **message: Any) -> dict[str, Any]:
    """A chat request of one user message with this content (and further keys)."""
    return {"model": "M", "messages": [{"role": "user", "content": content, **message}]}


# (name, path, body: a JSON value or raw bytes, status, param)
BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    ("not json", CHAT_PATH, b"{not json", 400, None),
    ("invalid utf-8", CHAT_PATH, b'{"model": "\xff\xfe"}', 400, None),
    ("json array", CHAT_PATH, [1, 2], 400, None),
    ("no messages", CHAT_PATH, {"model": "M"}, 400, "messages"),
    ("empty messages", CHAT_PATH, _chat(messages=[]), 400, "messages"),
    ("no model", CHAT_PATH, {"messages": CHAT}, 400, "model"),
    ("unknown model", CHAT_PATH, _chat(model="gpt-9"), 404, "model"),
    ("unknown field", CHAT_PATH, _chat(foo=1), 400, "foo"),
    ("content int", CHAT_PATH, _said(3), 400, "messages.0.content"),
    ("bad role", CHAT_PATH, _chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages.0.role"),
    ("message extra key", CHAT_PATH, _said("x", x=1), 400, "messages.0.x"),
    ("video part", CHAT_PATH, _said([{"type": "video_url", "video_url": {"url": "x"}}]), 400,
     "messages.0.content.0.type"),
    ("image part without --mmproj", CHAT_PATH,
     _said([{"type": "image_url", "image_url": {"url": "x"}}]), 400, None),
    ("negative max_tokens", CHAT_PATH, _chat(max_tokens=-1), 400, "max_tokens"),
    ("zero max_tokens", CHAT_PATH, _chat(max_tokens=0), 400, "max_tokens"),
    ("string max_tokens", CHAT_PATH, _chat(max_tokens="5"), 400, "max_tokens"),
    ("float max_completion_tokens", CHAT_PATH, _chat(max_completion_tokens=2.5), 400,
     "max_completion_tokens"),
    ("negative temperature", CHAT_PATH, _chat(temperature=-1), 400, "temperature"),
    ("string temperature", CHAT_PATH, _chat(temperature="hot"), 400, "temperature"),
    ("top_p zero", CHAT_PATH, _chat(top_p=0), 400, "top_p"),
    ("top_p above one", CHAT_PATH, _chat(top_p=1.5), 400, "top_p"),
    ("negative top_k", CHAT_PATH, _chat(top_k=-2), 400, "top_k"),
    ("min_p above one", CHAT_PATH, _chat(min_p=2), 400, "min_p"),
    ("presence_penalty 3", CHAT_PATH, _chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty -3", CHAT_PATH, _chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition_penalty 0", CHAT_PATH, _chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("negative seed", CHAT_PATH, _chat(seed=-1), 400, "seed"),
    ("stop int", CHAT_PATH, _chat(stop=5), 400, "stop"),
    ("empty stop string", CHAT_PATH, _chat(stop=[""]), 400, "stop"),
    ("too many stops", CHAT_PATH, _chat(stop=[str(i) for i in range(17)]), 400, "stop"),
    ("n zero", CHAT_PATH, _chat(n=0), 400, "n"),
    ("n huge", CHAT_PATH, _chat(n=100000), 400, "n"),
    ("top_logprobs 21", CHAT_PATH, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT_PATH, _chat(top_logprobs=2), 400, "top_logprobs"),
    ("logit_bias", CHAT_PATH, _chat(logit_bias={"5": 10}), 400, "logit_bias"),
    ("stream_options without stream", CHAT_PATH, _chat(stream_options={"include_usage": True}),
     400, "stream_options"),
    ("stream not bool", CHAT_PATH, _chat(stream="yes"), 400, "stream"),
    ("tool_choice names no tool", CHAT_PATH, _chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "nope"}}), 400, "tool_choice"),
    ("response_format bad type", CHAT_PATH, _chat(response_format={"type": "xml"}), 400,
     "response_format.type"),
    ("json_schema without its schema", CHAT_PATH, _chat(response_format={"type": "json_schema"}),
     400, "response_format.json_schema"),
    ("response_format with a forced call", CHAT_PATH, _chat(tools=[TOOL], tool_choice="required",
     response_format={"type": "json_object"}), 400, "response_format"),
    ("tool_choice without tools", CHAT_PATH, _chat(tool_choice="auto"), 400, "tool_choice"),
    ("parallel_tool_calls false", CHAT_PATH, _chat(tools=[TOOL], parallel_tool_calls=False), 400,
     "parallel_tool_calls"),
    ("tool without function", CHAT_PATH, _chat(tools=[{"type": "function"}]), 400,
     "tools.0.function"),
    ("tool name with spaces", CHAT_PATH, _chat(tools=[{"type": "function", "function": {
        "name": "get weather"}}]), 400, None),
    ("tool call arguments not text", CHAT_PATH, _chat(messages=[*CHAT, {
        "role": "assistant", "tool_calls": [{"id": "c", "type": "function",
        "function": {"name": "f", "arguments": 5}}]}]), 400,
     "messages.1.tool_calls.0.function.arguments"),
    ("huge body", CHAT_PATH, _big_body(), 413, None),
    ("prompt longer than the context", TEXT_PATH, _text(prompt=[5] * (N_CTX + 10)), 400, None),
    ("empty token list", TEXT_PATH, _text(prompt=[]), 400, "prompt"),
    ("prompt dict", TEXT_PATH, _text(prompt={"a": 1}), 400, "prompt"),
    ("token id out of range", TEXT_PATH, _text(prompt=[-5]), 400, None),
    ("echo", TEXT_PATH, _text(echo=True), 400, "echo"),
    ("suffix", TEXT_PATH, _text(suffix="y"), 400, "suffix"),
    ("completion logprobs 50", TEXT_PATH, _text(logprobs=50), 400, "logprobs"),
    ("unknown route", "/v1/embeddings", {"model": "M", "input": "x"}, 404, None),
    ("detokenize bad ids", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("tokenize prompt and messages", "/tokenize", {"prompt": "x", "messages": CHAT}, 400,
     "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_the_right_error(
    http: httpx.Client, server: Any, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.model_name}
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_the_server_keeps_serving_after_bad_requests(sdk: openai.OpenAI, server: Any) -> None:
    assert len(BAD_REQUESTS) >= 30
    reply = sdk.chat.completions.create(model=server.model_name, messages=CHAT, max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert server.health().ok


def test_api_key_is_required(server: Any) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as bare:
        assert bare.get("/v1/models").status_code == 401
        wrong = bare.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        assert bare.get("/health").status_code == 200
        assert bare.get("/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="bad", max_retries=0).models.list()


def test_metrics_count_tokens_and_latencies(
    http: httpx.Client, sdk: openai.OpenAI, server: Any
) -> None:
    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[1]) if lines else 0.0

    before = http.get("/metrics").text
    sdk.chat.completions.create(model=server.model_name, messages=CHAT, max_tokens=5)
    after = http.get("/metrics").text
    for name, grew in [
        ("pygemma4:generation_tokens_total", 5),
        ("pygemma4:time_to_first_token_seconds_count", 1),
        ("pygemma4:e2e_request_latency_seconds_count", 1),
        ("pygemma4:inter_token_latency_seconds_count", 4),
    ]:
        assert value(after, name) - value(before, name) == grew, name
    assert value(after, "pygemma4:num_requests_running") == 0
    assert value(after, "pygemma4:num_requests_waiting") == 0


def _long(model: str) -> dict[str, Any]:
    """A streamed completion that runs for seconds (LONG tokens, past any end token)."""
    return {
        "model": model,
        "prompt": "Hello",
        "max_tokens": LONG,
        "stream": True,
        "ignore_eos": True,
    }


def test_a_disconnected_client_has_its_request_cancelled(server: Any) -> None:
    body = _long(server.model_name)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.health().requests_in_flight == 1
    server.wait_idle(timeout=1.0)


def _gauge(http: httpx.Client, name: str) -> float:
    """The value of an unlabelled gauge on /metrics."""
    line = next(
        line for line in http.get("/metrics").text.splitlines() if line.startswith(name + " ")
    )
    return float(line.split()[1])


def test_kv_usage_is_reported_while_a_request_holds_the_pool(server: Any) -> None:
    usage = "pygemma4:kv_cache_usage_perc"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        server.wait_idle(timeout=5.0)
        wait_until(lambda: _gauge(http, usage) == 0.0, 5.0, "an idle pool")
        with http.stream("POST", "/v1/completions", json=_long(server.model_name)) as response:
            lines = response.iter_lines()  # kept: dropping the iterator closes the stream
            assert next(line for line in lines if line.startswith("data:"))
            # The decode worker tells the front end as it admits: the message may trail.
            wait_until(lambda: _gauge(http, usage) > 0.0, 5.0, "KV held by the stream")
            assert _gauge(http, usage) <= 1.0
            health = http.get("/health").json()
            assert 0 < health["kv_blocks_used"] <= health["kv_blocks_total"]
            assert _gauge(http, "pygemma4:kv_cache_blocks_total") == health["kv_blocks_total"]
        wait_until(lambda: _gauge(http, usage) == 0.0, 5.0, "the pool freed after the stream")


def test_a_worker_dying_mid_stream_is_an_error_event(server: Any) -> None:
    body = _long(server.model_name)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    events: list[str] = []
    with (
        httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line.removeprefix("data: "))
            if len(events) == 1:
                os.kill(server.worker("decode").pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "worker_failed", error
    server.wait_healthy(timeout=60)
    wait_until(lambda: server.health().requests_in_flight == 0, 10, "no request in flight")


def test_concurrent_http_streams_lose_and_mix_nothing(sdk: openai.OpenAI, server: Any) -> None:
    """64 clients streaming 500 requests between them: each answer is its own request's greedy
    text, whole, ended by [DONE] with its usage."""
    n_clients, n_requests = 64, 500
    prompts = ["Hello", "Once upon a time", "What is 2+2?", "The sky", "A B C", "Tell me"]
    lengths = [1, 3, 7, 12, 16, 24]
    jobs = [(i % len(prompts), lengths[i * 7 % len(lengths)]) for i in range(n_requests)]
    references = {
        job: sdk.completions.create(
            model=server.model_name,
            prompt=prompts[job[0]],
            max_tokens=job[1],
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for job in set(jobs)
    }
    answered: list[tuple[tuple[int, int], str, dict[str, Any] | None, str]] = []
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def client_task(queue: asyncio.Queue[tuple[int, int]]) -> None:
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=120) as c:
            while not queue.empty():
                which, n = job = queue.get_nowait()
                body = {
                    "model": server.model_name,
                    "prompt": prompts[which],
                    "max_tokens": n,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                text, usage, last = "", None, ""
                async with c.stream("POST", "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        last = line.removeprefix("data: ")
                        if last == "[DONE]":
                            continue
                        event = json.loads(last)
                        text += "".join(choice["text"] for choice in event["choices"])
                        usage = event.get("usage") or usage
                answered.append((job, text, usage, last))

    async def main() -> None:
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        await asyncio.gather(*(client_task(queue) for _ in range(n_clients)))

    asyncio.run(main())
    assert len(answered) == n_requests
    for job, text, usage, last in answered:
        assert last == "[DONE]", job
        assert text == references[job], job
        assert usage is not None and usage["completion_tokens"] == job[1], job
    server.wait_idle()


def test_a_killed_decode_worker_ends_every_open_stream_within_a_second(server: Any) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = _long(server.model_name)
    ended_after: list[float] = []

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as c:
            started = asyncio.Event()
            killed_at: list[float] = []
            streaming = 0

            async def one_stream() -> None:
                nonlocal streaming
                async with c.stream("POST", "/v1/completions", json=body) as response:
                    events = []
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        events.append(line.removeprefix("data: "))
                        if len(events) == 1:
                            streaming += 1
                            if streaming == 3:
                                started.set()
                        if events[-1] == "[DONE]":
                            break
                    ended_after.append(asyncio.get_running_loop().time() - killed_at[0])
                    assert json.loads(events[-2])["error"]["code"] == "worker_failed"

            async def kill() -> None:
                await started.wait()
                killed_at.append(asyncio.get_running_loop().time())
                os.kill(server.worker("decode").pid, signal.SIGKILL)

            await asyncio.gather(one_stream(), one_stream(), one_stream(), kill())

    asyncio.run(main())
    assert len(ended_after) == 3 and max(ended_after) < 1.0, ended_after
    server.wait_healthy(timeout=60)
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as c:
        reply = c.post(
            "/v1/completions", json={"model": server.model_name, "prompt": "Hi", "max_tokens": 4}
        )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


@contextlib.contextmanager
def pygemma4_http(endpoint: str, workdir: Path, *args: str) -> Iterator[str]:
    """`pygemma4 http --endpoint ENDPOINT ARGS` on a free port, once it answers; its base URL.
    It must stop cleanly on Ctrl-C."""
    listen = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "pygemma4", "http", "--endpoint", endpoint, *args]
    with open(workdir / "http.stderr", "wb") as err:
        process = subprocess.Popen(
            [*command, "--listen", listen], stderr=err, stdin=subprocess.DEVNULL, cwd=workdir
        )
    base_url = f"http://{listen}"
    try:
        wait_until(lambda: _answers(base_url), 30, "pygemma4 http answers")
        yield base_url
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0, (workdir / "http.stderr").read_text()


@pytest.fixture(scope="module")
def remote_http(demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`pygemma4 http` (no key, no model file) in front of a server of its own that takes one
    request at a time (--max-pending 1); its base URL."""
    workdir = tmp_path_factory.mktemp("remote")
    args = ("--threads", "1", "--max-batch", "1", "--n-ctx", str(N_CTX), "--max-pending", "1")
    with (
        ServeProcess.running(demo_model_file, workdir, *args) as serve,
        pygemma4_http(serve.endpoint, workdir) as base_url,
    ):
        yield base_url


def _answers(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_pygemma4_http_serves_a_server_elsewhere(remote_http: str) -> None:
    with openai.OpenAI(base_url=remote_http + "/v1", api_key="unused", max_retries=0) as sdk:
        name = sdk.models.list().data[0].id
        reply = sdk.completions.create(
            model=name, prompt="Hello", max_tokens=3, temperature=0, logprobs=1
        )
    assert all(t.startswith("token_id:") for t in reply.choices[0].logprobs.tokens)
    refused = httpx.post(remote_http + "/tokenize", json={"prompt": "x"}, timeout=10)
    assert refused.status_code == 501
    assert "--model" in refused.json()["error"]["message"]


def test_a_busy_server_is_429(remote_http: str) -> None:
    with httpx.Client(base_url=remote_http, timeout=30) as client:
        name = client.get("/v1/models").json()["data"][0]["id"]
        long = _long(name)
        with client.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: dropping it closes the stream
            assert next(line for line in lines if line.startswith("data:"))
            busy = client.post("/v1/completions", json={"model": name, "prompt": "Hi"})
        assert busy.status_code == 429, busy.text
        assert busy.json()["error"]["code"] == "busy"


def test_the_http_api_reaches_a_server_that_requires_curve(
    demo_model_file: Path, tmp_path: Path
) -> None:
    keys, admitted = tmp_path / "keys", tmp_path / "admitted"
    for name in ("server", "alice"):
        create_keypair(keys, name)
    admitted.mkdir()
    shutil.copy(keys / "alice.key", admitted)
    listen = f"127.0.0.1:{free_port()}"
    args = (
        "--threads", "1", "--http", listen,
        "--curve-secret-key", str(keys / "server.key_secret"), "--curve-clients", str(admitted),
    )  # fmt: skip
    alice = ("--curve-secret-key", str(keys / "alice.key_secret"))
    alice_options = {"curve_secret_key": keys / "alice.key_secret"}
    with ServeProcess.running(
        demo_model_file,
        tmp_path,
        *args,
        client_options={**alice_options, "curve_server_key": keys / "server.key"},
    ) as server:
        # The server's own HTTP front end authenticates with a pair made for this run; the
        # clients' directory admits only alice.
        assert sorted(p.name for p in admitted.iterdir()) == ["alice.key"]
        with openai.OpenAI(base_url=f"http://{listen}/v1", api_key="-", max_retries=0) as sdk:
            reply = sdk.completions.create(
                model=demo_model_file.name, prompt="Hello", max_tokens=3, temperature=0
            )
        assert reply.usage.completion_tokens == 3
        with server.client(timeout=10) as client:
            expected = client.complete("Hello", 3, temperature=0).text
        assert reply.choices[0].text == expected
        # `pygemma4 http` elsewhere, as alice.
        curve_args = (*alice, "--curve-server-key", str(keys / "server.key"))
        with (
            pygemma4_http(server.endpoint, tmp_path, *curve_args) as base_url,
            openai.OpenAI(base_url=base_url + "/v1", api_key="-", max_retries=0) as sdk,
        ):
            again = sdk.completions.create(
                model=demo_model_file.name, prompt="Hello", max_tokens=3, temperature=0
            )
        assert again.choices[0].text == expected


def test_pygemma4_http_refuses_half_or_wrong_curve_keys(tmp_path: Path) -> None:
    create_keypair(tmp_path, "alice")
    command = [sys.executable, "-m", "pygemma4", "http", "--endpoint", free_tcp_endpoint()]
    for args, said in [
        (("--curve-secret-key", str(tmp_path / "alice.key_secret")), "go together"),
        (
            ("--curve-secret-key", str(tmp_path / "alice.key"), "--curve-server-key",
             str(tmp_path / "alice.key")),
            "holds no secret key",
        ),
        (
            ("--curve-secret-key", str(tmp_path / "alice.key_secret"), "--curve-server-key",
             str(tmp_path / "nobody.key")),
            "no such key file",
        ),
    ]:  # fmt: skip
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
        assert result.returncode != 0 and said in result.stderr, result.stderr
