"""The OpenAI API's request models and reply shapes, without a server: which field a refusal
names, what each request asks of the server, and the logprobs OpenAI's clients parse."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pygemma4.client import CompletionResult, StreamChunk
from pygemma4.openai_api import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    parse_request,
)
from pygemma4.protocol import TokenLogprobs
from pygemma4.workers.http import Shape

CHAT = [{"role": "user", "content": "Hi"}]


def _chat(**fields: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"model": "m", "messages": CHAT, **fields})


def _refusal(model: type, body: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(model, body)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": CHAT, "bogus": 1}, "bogus"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "video_url"}]}]},
         "messages.0.content.0.type"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "messages.0.content.0"),
        ({"model": "m", "messages": CHAT, "n": 0}, "n"),
        ({"model": 3, "messages": CHAT}, "model"),
        ({"model": "m", "messages": CHAT, "temperature": True}, "temperature"),
        ([], None),
    ],
)  # fmt: skip
def test_refusals_name_the_field(body: Any, param: str | None) -> None:
    error = _refusal(ChatCompletionRequest, body)
    assert error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert param in error.message


def test_sampling_fields_are_checked_by_the_sampler_and_named() -> None:
    request = _chat(temperature=0.5, top_k=3, stop="x", seed=1)
    assert request.sampling(0) == {"temperature": 0.5, "top_k": 3, "stop": "x", "seed": 1}
    for field, value in [("top_p", 0.0), ("min_p", 1.5), ("seed", -3), ("stop", [""])]:
        with pytest.raises(ApiError) as caught:
            _chat(**{field: value}).sampling(0)
        assert caught.value.param == field


def test_logprobs_ask_the_server_for_at_least_one_alternative() -> None:
    assert _chat().logprobs_wanted() == 0
    assert _chat(logprobs=True).logprobs_wanted() == 1
    assert _chat(logprobs=True, top_logprobs=5).logprobs_wanted() == 5
    assert _chat(logprobs=True, top_logprobs=5).sampling(5)["logprobs"] == 5
    with pytest.raises(ApiError) as caught:
        _chat(top_logprobs=2).logprobs_wanted()
    assert caught.value.param == "top_logprobs"


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert _chat(max_tokens=5).max_new_tokens() == 5
    assert _chat(max_tokens=5, max_completion_tokens=7).max_new_tokens() == 7
    assert _chat().max_new_tokens() is None


def test_refusals_of_what_the_server_does_not_do() -> None:
    with pytest.raises(ApiError) as caught:
        _chat(logit_bias={"1": 2.0}).check_common()
    assert caught.value.param == "logit_bias"
    _chat(logit_bias={}).check_common()
    text = {"model": "m", "prompt": "x"}
    for field, value in [("echo", True), ("suffix", "y"), ("best_of", 2)]:
        with pytest.raises(ApiError) as caught:
            parse_request(CompletionRequest, {**text, field: value}).check_completion()
        assert caught.value.param == field


def test_completion_prompts_and_defaults() -> None:
    def prompts(prompt: Any, **fields: Any) -> list[Any]:
        return parse_request(
            CompletionRequest, {"model": "m", "prompt": prompt, **fields}
        ).prompts()

    assert prompts("x") == ["x"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    request = parse_request(CompletionRequest, {"model": "m", "prompt": "x"})
    assert request.max_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS
    for bad in ([], [[]]):
        with pytest.raises(ApiError):
            prompts(bad)
    with pytest.raises(ApiError) as caught:
        prompts(["a"] * 10, n=20)
    assert caught.value.param == "n"
    assert _refusal(CompletionRequest, {"model": "m", "prompt": [2**31]}).param == "prompt.0"


def _token_bytes(token_id: int) -> bytes:
    return {1: b"He", 2: b"llo", 3: b"\xe2\x82"}.get(token_id, b"?")


def test_chat_logprobs_shape() -> None:
    logprobs = [
        TokenLogprobs(logprob=-0.5, top=[(1, -0.5), (2, -1.0)]),
        TokenLogprobs(logprob=-0.25, top=[(2, -0.25)]),
    ]
    shaped = chat_logprobs([1, 2], logprobs, 1, _token_bytes)
    assert shaped == {
        "content": [
            {
                "token": "He",
                "logprob": -0.5,
                "bytes": [72, 101],
                "top_logprobs": [{"token": "He", "logprob": -0.5, "bytes": [72, 101]}],
            },
            {
                "token": "llo",
                "logprob": -0.25,
                "bytes": [108, 108, 111],
                "top_logprobs": [{"token": "llo", "logprob": -0.25, "bytes": [108, 108, 111]}],
            },
        ]
    }
    partial = chat_logprobs([3], [TokenLogprobs(logprob=-1.0)], 0, _token_bytes)["content"][0]
    assert partial["bytes"] == [0xE2, 0x82] and partial["top_logprobs"] == []


def test_completion_logprobs_shape() -> None:
    logprobs = [
        TokenLogprobs(logprob=-0.5, top=[(1, -0.5), (2, -1.0)]),
        TokenLogprobs(logprob=-0.25, top=[(2, -0.25)]),
    ]
    shaped = completion_logprobs([1, 2], logprobs, 2, _token_bytes, text_offset=4)
    assert shaped == {
        "tokens": ["He", "llo"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"He": -0.5, "llo": -1.0}, {"llo": -0.25}],
        "text_offset": [4, 6],
    }


RAW_OUTPUT = (
    "<|channel>thought\nThe user wants weather.<channel|>Let me check."
    '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'
    '<|tool_call>call:get_time{zone:<|"|>CET<|"|>}<tool_call|>'
)


def _result(text: str, reason: str = "stop", in_reasoning: bool = False) -> CompletionResult:
    return CompletionResult(
        text=text,
        token_ids=(),
        finish_reason=reason,  # type: ignore[arg-type]
        prompt_tokens=1,
        completion_tokens=1,
        logprobs=None,
        in_reasoning=in_reasoning,
    )


def _streamed(text: str, cut: int, reason: str = "stop") -> dict[str, Any]:
    """The message the streamed choices of `text` (fed `cut` characters at a time) add up to,
    as an OpenAI client assembles it, and the finish reason."""
    shape = Shape(chat=True, top_logprobs=-1, token_bytes=_token_bytes)
    choices = []
    for start in range(0, len(text), cut):
        chunk = StreamChunk(text=text[start : start + cut], token_ids=(1,), logprobs=None)
        choice = shape.delta(0, chunk)
        if choice is not None:
            choices.append(choice)
    choices += shape.stream_end(0, _result(text, reason))
    content, reasoning, calls = "", "", {}
    for choice in choices:
        delta = choice["delta"]
        content += delta.get("content", "")
        reasoning += delta.get("reasoning_content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in call:
                entry.update(id=call["id"], name=call["function"]["name"])
            entry["arguments"] += call["function"]["arguments"]
    return {
        "content": content,
        "reasoning": reasoning,
        "calls": [(c["name"], json.loads(c["arguments"])) for c in calls.values()],
        "ids": [c["id"] for c in calls.values()],
        "finish_reason": choices[-1]["finish_reason"],
    }


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 1000])
def test_chat_replies_parse_reasoning_and_tool_calls_streamed_as_whole(cut: int) -> None:
    shape = Shape(chat=True, top_logprobs=-1, token_bytes=_token_bytes)
    whole = shape.final(0, _result(RAW_OUTPUT))
    message = whole["message"]
    assert message["content"] == "Let me check."
    assert message["reasoning_content"] == "The user wants weather."
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in
             message["tool_calls"]]  # fmt: skip
    assert calls == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in
               message["tool_calls"])  # fmt: skip
    assert whole["finish_reason"] == "tool_calls"
    streamed = _streamed(RAW_OUTPUT, cut)
    assert streamed["content"] == message["content"]
    assert streamed["reasoning"] == message["reasoning_content"]
    assert streamed["calls"] == calls
    assert all(i is not None and i.startswith("call_") for i in streamed["ids"])
    assert streamed["finish_reason"] == "tool_calls"


def test_chat_replies_without_calls_and_cut_short() -> None:
    shape = Shape(chat=True, top_logprobs=-1, token_bytes=_token_bytes)
    plain = shape.final(0, _result("Hello there"))
    assert plain["message"] == {
        "role": "assistant",
        "content": "Hello there",
        "reasoning_content": None,
    }
    assert plain["finish_reason"] == "stop"
    cut_short = shape.final(0, _result(RAW_OUTPUT[:60], reason="length"))
    assert cut_short["finish_reason"] == "length"
    thinking = shape.final(0, _result("still thinking<channel|>Answer", in_reasoning=True))
    assert thinking["message"]["reasoning_content"] == "still thinking"
    assert thinking["message"]["content"] == "Answer"
    assert _streamed("Hello there", 2)["finish_reason"] == "stop"
