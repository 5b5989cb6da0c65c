"""The wire protocol on its own: every message round-trips, and decoding is strict."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from pygemma4 import SamplingParams, SamplingParamsError, protocol


def client_messages() -> list[msgspec.Struct]:
    sampling = protocol.wire_sampling(SamplingParams(temperature=0.5, seed=3, stop=["\n"]))
    return [
        protocol.Completion(id=1, prompt="Hello", max_tokens=8, sampling=sampling, stream=True),
        protocol.Completion(id=2**63 - 1, prompt=[2, 5, 9], ignore_eos=True),
        protocol.Chat(id=3, messages=[protocol.ChatMessage(role="user", content="Hi")]),
        protocol.Chat(
            id=7,
            messages=[
                protocol.ChatMessage(role="developer", content=[protocol.TextPart(text="Hi")]),
                protocol.ChatMessage(
                    role="assistant",
                    content=None,
                    reasoning_content="Look it up.",
                    tool_calls=[
                        protocol.ToolCall(
                            id="call_1",
                            function=protocol.FunctionCall(name="f", arguments='{"a": 1}'),
                        ),
                        protocol.ToolCall(
                            function=protocol.FunctionCall(name="g", arguments={"b": [1, None]})
                        ),
                    ],
                ),
                protocol.ChatMessage(role="tool", content="2", tool_call_id="call_1", name="f"),
            ],
            tools=[
                protocol.ToolDefinition(
                    function=protocol.FunctionDefinition(
                        name="f", description="F.", parameters={"type": "object"}, strict=True
                    )
                )
            ],
            chat_template_kwargs={"enable_thinking": True, "depth": [1, {"x": None}]},
            raw_text=True,
        ),
        protocol.Cancel(id=4),
        protocol.Health(id=5),
        protocol.Info(id=6),
    ]


def server_replies() -> list[msgspec.Struct]:
    logprobs = [protocol.TokenLogprobs(logprob=-0.5, top=[(7, -0.5), (9, -1.5)])]
    return [
        protocol.Chunk(id=1, token_ids=[7], text="a", logprobs=logprobs),
        protocol.Chunk(id=1, token_ids=[7], text="<|channel>", in_reasoning=True),
        protocol.Done(
            id=1, finish_reason="stop", prompt_tokens=3, completion_tokens=1, in_reasoning=True
        ),
        protocol.Done(id=1, finish_reason="stop", prompt_tokens=3, completion_tokens=1),
        protocol.Done(
            id=2, finish_reason="length", prompt_tokens=3, completion_tokens=1, token_ids=[7]
        ),
        protocol.Cancelled(id=3),
        protocol.Error(id=None, code="bad_request", message="undecodable"),
        protocol.HealthStatus(
            id=4,
            ok=True,
            workers=[protocol.WorkerState(name="decode", pid=10, alive=True, restarts=0)],
            requests_in_flight=0,
        ),
        protocol.ServerInfo(
            id=5,
            model="m.gguf",
            architecture="gemma4",
            vocab_size=10,
            n_ctx=64,
            max_batch=2,
            max_pending=4,
            max_message_bytes=1024,
        ),
    ]


@pytest.mark.parametrize("message", client_messages(), ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message: msgspec.Struct) -> None:
    assert protocol.decode_request(protocol.encode(message)) == message


@pytest.mark.parametrize("reply", server_replies(), ids=lambda m: type(m).__name__)
def test_replies_round_trip(reply: msgspec.Struct) -> None:
    assert protocol.decode_reply(protocol.encode(reply)) == reply


def test_internal_messages_round_trip_with_an_embedded_reply() -> None:
    done = protocol.Done(id=1, finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    reply = protocol.EncodedReply(rid=5, final=True, reply=msgspec.Raw(protocol.encode(done)))
    frontend = protocol.InboxDecoder("frontend", protocol.FrontEndInbox)
    decoded = frontend.decode(protocol.encode(reply))
    assert isinstance(decoded, protocol.EncodedReply)
    assert protocol.decode_reply(bytes(decoded.reply)) == done


def test_an_internal_message_for_another_inbox_is_misrouted_naming_both() -> None:
    tokenizer = protocol.InboxDecoder("tokenizer-0", protocol.TokenizerInbox)
    frame = protocol.encode(protocol.TokenizedRequest(
        rid=1, prompt_ids=[2], max_tokens=1, sampling=protocol.Sampling(), stop_token_ids=[],
        tokenizer=0,
    ))  # fmt: skip
    with pytest.raises(
        protocol.MisroutedMessageError, match=r"^TokenizedRequest sent to tokenizer-0, "
    ):
        tokenizer.decode(frame)


def test_an_invalid_internal_message_names_the_field_not_a_misroute() -> None:
    decode = protocol.InboxDecoder("decode", protocol.DecodeInbox)
    frame = msgspec.msgpack.encode({"type": "ended", "rids": ["one"]})
    with pytest.raises(protocol.ProtocolError, match=r"\$\.rids\[0\]") as raised:
        decode.decode(frame)
    assert not isinstance(raised.value, protocol.MisroutedMessageError)


def test_sampling_on_the_wire_has_exactly_the_fields_of_sampling_params() -> None:
    wire = {f for f in protocol.Sampling.__struct_fields__}
    assert wire == {f.name for f in dataclasses.fields(SamplingParams)}
    params = SamplingParams(top_k=5, min_p=0.1, logprobs=3, seed=2**64 - 1)
    assert protocol.sampling_params(protocol.wire_sampling(params)) == params


def test_sampling_ranges_are_checked_by_sampling_params() -> None:
    with pytest.raises(SamplingParamsError, match="top_p"):
        protocol.sampling_params(protocol.Sampling(top_p=1.5))


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ({"type": "completion", "id": 1, "prompt": "x", "colour": 1}, "unknown field `colour`"),
        ({"type": "completion", "id": 1, "prompt": "x", "sampling": {"temp": 1}}, "`temp`"),
        ({"type": "completion", "id": 1, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"type": "completion", "id": 1, "prompt": [1, -2]}, "prompt[1]"),
        ({"type": "completion", "id": 1}, "missing required field `prompt`"),
        ({"type": "completion", "id": -1, "prompt": "x"}, "$.id"),
        ({"type": "chat", "id": 1, "messages": [{"role": "user", "content": 5}]}, "content"),
        (
            {
                "type": "chat",
                "id": 1,
                "messages": [{"role": "user", "content": [{"type": "image"}]}],
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "type": "chat",
                "id": 1,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "a b"}}],
            },
            "tools[0].function.name",
        ),
        (
            {
                "type": "chat",
                "id": 1,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"function": {"name": "f", "parameters": "{}"}}],
            },
            "tools[0].function.parameters",
        ),
        (
            {
                "type": "chat",
                "id": 1,
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"function": {"name": "f", "arguments": 3}}],
                    }
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "type": "chat",
                "id": 1,
                "messages": [{"role": "user", "content": "x"}],
                "chat_template_kwargs": ["enable_thinking"],
            },
            "chat_template_kwargs",
        ),
        ({"type": "launch", "id": 1}, "$.type"),
        ({"id": 1}, "type"),
        ([1, 2], "Expected `object`"),
    ],
)
def test_invalid_requests_name_the_problem(message: object, problem: str) -> None:
    frame = msgspec.msgpack.encode(message)
    with pytest.raises(
        protocol.ProtocolError, match=problem.replace("[", r"\[").replace("$", r"\$")
    ):
        protocol.decode_request(frame)


def test_undecodable_frames_are_protocol_errors() -> None:
    for frame in (b"", b"\xc1", b"\x92\x01"):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_request(frame)


def test_request_id_of_reads_what_it_can() -> None:
    assert protocol.request_id_of(msgspec.msgpack.encode({"id": 42, "junk": 1})) == 42
    assert protocol.request_id_of(msgspec.msgpack.encode({"id": True})) is None
    assert protocol.request_id_of(msgspec.msgpack.encode({"id": -1})) is None
    assert protocol.request_id_of(msgspec.msgpack.encode([1])) is None
    assert protocol.request_id_of(b"\xc1") is None


def test_a_chat_of_plain_messages_encodes_as_before() -> None:
    """New fields are optional and left out at their defaults, so older peers read the
    messages they know unchanged."""
    chat = protocol.Chat(id=3, messages=[protocol.ChatMessage(role="user", content="Hi")])
    assert msgspec.msgpack.decode(protocol.encode(chat)) == {
        "type": "chat",
        "id": 3,
        "messages": [{"role": "user", "content": "Hi"}],
        "sampling": {},
    }
    done = protocol.Done(id=1, finish_reason="stop", prompt_tokens=3, completion_tokens=1)
    assert "in_reasoning" not in msgspec.msgpack.decode(protocol.encode(done))


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"x": 2**64}, "can't serialize ints"), (_nested(100_000), "recursion")],
    ids=["int-beyond-64-bits", "deep-nesting"],
)
def test_encode_refuses_what_msgpack_cannot_carry(kwargs: dict[str, Any], match: str) -> None:
    chat = protocol.Chat(id=1, messages=[], chat_template_kwargs=kwargs)
    with pytest.raises(protocol.ProtocolError, match=f"cannot encode the chat: .*{match}"):
        protocol.encode(chat)
