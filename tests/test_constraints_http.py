"""Constrained decoding through the OpenAI API, beside test_http's checks: a greedy json_schema
reply equals the ZeroMQ client's for the same request and streams the same; forced tool calls
(required, named) validate whole and streamed; a schema llguidance rejects is a 400 naming the
problem. A real `pygemma4 serve` with its HTTP front end, spoken to by the `openai` SDK, serves
the demo model with Gemma 4's tool-call tokens in its vocabulary (the demo and reference
vocabularies lack them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from serve_helpers import ServeProcess, free_tcp_endpoint
from test_constraints import (
    MAX_TOKENS,
    PERSON,
    TOOLS,
    with_tool_tokens,
)

TOOL_MODEL = "demo-tools.gguf"


@pytest.fixture(scope="module")
def tool_model(demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_tool_tokens(demo_model_file, tmp_path_factory.mktemp("tools") / TOOL_MODEL)


@pytest.fixture(scope="module")
def http_server(tool_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The demo model with the tool-call tokens, served with its HTTP API on a free port."""
    port = int(free_tcp_endpoint().rsplit(":", 1)[1])
    listen = f"127.0.0.1:{port}"
    args = ("--threads", "1", "--n-ctx", "512", "--http", listen)
    with ServeProcess.running(tool_model, tmp_path_factory.mktemp("http"), *args) as serve:
        serve.base_url = f"http://{listen}/v1"
        yield serve


@pytest.fixture
def sdk(http_server: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=http_server.base_url, api_key="none", max_retries=0) as client:
        yield client


CHAT = [{"role": "user", "content": "Describe someone."}]


def test_response_format_json_schema_over_http(sdk: openai.OpenAI, http_server: Any) -> None:
    schema_format = {"name": "person", "schema": PERSON, "strict": True}
    reply = sdk.chat.completions.create(
        model=TOOL_MODEL,
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": schema_format},
    )
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), PERSON)
    with http_server.client() as client:  # the ZeroMQ client's tokens for the same request
        direct = client.chat(CHAT, MAX_TOKENS, temperature=0, json_schema=json.dumps(PERSON))
    assert direct.text == content
    assert reply.usage.completion_tokens == direct.completion_tokens
    streamed = sdk.chat.completions.create(
        model=TOOL_MODEL,
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": schema_format},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == content
    for seed in range(2):
        sampled = sdk.chat.completions.create(
            model=TOOL_MODEL,
            messages=CHAT,
            max_tokens=MAX_TOKENS,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": schema_format},
        )
        jsonschema.validate(json.loads(sampled.choices[0].message.content), PERSON)


@pytest.mark.parametrize("tool_choice", ["required", "get_weather", "ping"])
def test_forced_tool_choice_over_http(sdk: openai.OpenAI, tool_choice: str) -> None:
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}
    choice: Any = tool_choice
    if tool_choice != "required":
        choice = {"type": "function", "function": {"name": tool_choice}}
    for seed, stream in [(0, False), (1, False), (1, True)]:
        request = {
            "model": TOOL_MODEL,
            "messages": [{"role": "user", "content": "What is the weather?"}],
            "tools": TOOLS,
            "tool_choice": choice,
            "max_tokens": MAX_TOKENS,
            "seed": seed,
        }
        if stream:
            chunks = list(sdk.chat.completions.create(**request, stream=True))
            deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
            assert {d.index for d in deltas} == {0}  # exactly one call
            name = deltas[0].function.name
            arguments = "".join(d.function.arguments or "" for d in deltas)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            reply = sdk.chat.completions.create(**request)
            (call,) = reply.choices[0].message.tool_calls
            name, arguments = call.function.name, call.function.arguments
            finish = reply.choices[0].finish_reason
            assert not reply.choices[0].message.content
        assert finish == "tool_calls"
        assert tool_choice == "required" or name == tool_choice
        jsonschema.validate(json.loads(arguments), schemas[name] or {})


def test_a_schema_the_library_rejects_is_a_400_naming_the_problem(sdk: openai.OpenAI) -> None:
    schema_format = {
        "name": "x",
        "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
    }
    with pytest.raises(openai.BadRequestError) as error:
        sdk.chat.completions.create(
            model=TOOL_MODEL,
            messages=CHAT,
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": schema_format},
        )
    body = error.value.body
    assert body["param"] == "response_format"
    assert "json_schema is not usable: Invalid type: nonsense" in body["message"]
    reply = sdk.chat.completions.create(model=TOOL_MODEL, messages=CHAT, max_tokens=2)
    assert reply.usage.completion_tokens == 2  # and the server goes on serving
