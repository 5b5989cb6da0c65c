"""The chat page at `/` in a real headless Chromium against a real `pygemma4 serve`: it answers a
question with the API's greedy text, keeps the conversation, sends the API key the server
requires (kept in localStorage), shows OpenAI error bodies and error events, folds reasoning
apart and renders tool calls (a real forced call, on the demo model with Gemma 4's tool-call
tokens). A screenshot of the page is kept in tests/artifacts/.

Needs Debian's `chromium` and the `playwright` package (its own browser download is not used);
without them the test skips, except under CI (`CI` set), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import ServeProcess, free_port
from test_constraints import with_tool_tokens

API_KEY = "page-key-456"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
REPLY_TIMEOUT_MS = 60_000
QUESTIONS = ["What is the capital of France?", "And of Italy?"]
MAX_TOKENS = 12
N_CTX = 8192
LONG = N_CTX - 64
"""max_tokens of a reply that runs for seconds on this model."""
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
            "required": ["city"],
        },
    },
}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the chat page test: install chromium and playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright."""
    executable = shutil.which("chromium")
    if executable is None:
        _unavailable("no chromium on PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        # Not the sanitizer runtime bench/sanitize.sh preloads for pygemma4: Chromium does not
        # start with it.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"], env=env
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The demo model, with Gemma 4's tool-call tokens in its vocabulary (for forced calls),
    served with its HTTP API, requiring API_KEY, on a free port."""
    model = with_tool_tokens(demo_model_file, tmp_path_factory.mktemp("model") / "demo-tools.gguf")
    listen = f"127.0.0.1:{free_port()}"
    args = ("--threads", "1", "--max-batch", "4", "--n-ctx", str(N_CTX), "--http", listen)
    with ServeProcess.running(
        model, tmp_path_factory.mktemp("serve"), *args, "--api-key", API_KEY
    ) as serve:
        serve.base_url = f"http://{listen}"
        yield serve


@pytest.fixture
def page(chromium: Any, server: Any) -> Iterator[Any]:
    context = chromium.new_context(base_url=server.base_url, viewport={"width": 900, "height": 900})
    page = context.new_page()
    page.set_default_timeout(REPLY_TIMEOUT_MS)
    yield page
    context.close()


def _api_reply(server: Any, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The API's whole (not streamed) greedy reply to `messages`."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        reply = http.post("/v1/chat/completions", json={**body, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]


def _ask(page: Any, question: str) -> Any:
    """Type `question`, send it with Enter, and wait for the reply to finish; the reply's item."""
    before = page.locator("li.message.assistant").count()
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    reply = page.locator("li.message.assistant").nth(before)
    reply.and_(page.locator("[data-state=done], [data-state=error]")).wait_for()
    return reply


def _screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    print(f"chat page screenshot: {path}")


def _set(page: Any, selector: str, value: str) -> None:
    page.fill(selector, value)
    page.dispatch_event(selector, "change")


def test_the_page_answers_as_the_api_does_and_keeps_the_conversation(
    page: Any, server: Any
) -> None:
    index = httpx.get(server.base_url + "/")  # the page itself needs no key
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert httpx.get(server.base_url + "/web/app.js").status_code == 200
    assert httpx.get(server.base_url + "/web/missing.js").status_code == 404
    page.goto("/")
    page.wait_for_selector("#model-name:has-text('unavailable')")
    assert "a valid API key is required" in page.inner_text("#model-name")
    assert page.locator("#settings").get_attribute("open") is not None  # opened at the key
    assert page.evaluate("document.activeElement.id") == "api-key"

    refused = _ask(page, QUESTIONS[0])
    assert refused.get_attribute("data-state") == "error"
    assert "a valid API key is required" in refused.locator(".error[role=alert]").inner_text()

    _set(page, "#api-key", API_KEY)
    page.wait_for_selector("#model-name:not(:has-text('connecting'))")
    assert page.inner_text("#model-name") == server.model.name
    _set(page, "#temperature", "0")
    _set(page, "#max-tokens", str(MAX_TOKENS))

    history: list[dict[str, Any]] = []
    for question in QUESTIONS:
        history.append({"role": "user", "content": question})
        with page.expect_request("**/v1/chat/completions") as sent:
            reply = _ask(page, question)
        body = sent.value.post_data_json
        assert sent.value.headers["authorization"] == f"Bearer {API_KEY}"
        assert body["messages"] == history
        assert (body["stream"], body["temperature"], body["max_tokens"]) == (True, 0, MAX_TOKENS)
        expected = _api_reply(server, history)
        assert expected["content"]
        assert reply.get_attribute("data-state") == "done"
        assert reply.locator(".content").inner_text() == expected["content"]
        assert reply.locator(".reasoning").is_hidden()
        history.append({"role": "assistant", "content": expected["content"]})

    _screenshot(page, "chat-page.png")

    page.reload()
    assert page.input_value("#api-key") == API_KEY
    page.wait_for_selector(f"#model-name:has-text('{server.model.name}')")


def _events(*chunks: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"object": "chat.completion.chunk", "choices": [choice]}


# A reply with reasoning, text and two tool calls, the first one's arguments split.
REASONING_AND_CALLS = _events(
    _delta({"role": "assistant", "content": ""}),
    _delta({"reasoning_content": "The user wants "}),
    _delta({"reasoning_content": "the weather."}),
    _delta({"content": "Let me look."}),
    _delta(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": '},
                }
            ]
        }
    ),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    _delta(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ]
        }
    ),
    _delta({}, "tool_calls"),
)

ERROR_EVENT = _events(
    _delta({"content": "Half an ans"}),
    {
        "error": {
            "message": "the decode worker died",
            "type": "server_error",
            "code": "worker_failed",
        }
    },
)


def test_reasoning_tool_calls_and_error_events_are_shown_apart(page: Any, server: Any) -> None:
    """The server's model cannot produce reasoning or these calls, so their streams are given
    to the page in place of the server's."""
    replies = [REASONING_AND_CALLS, ERROR_EVENT]
    bodies: list[dict[str, Any]] = []

    def answer(route: Any) -> None:
        bodies.append(route.request.post_data_json)
        route.fulfill(status=200, content_type="text/event-stream", body=replies[len(bodies) - 1])

    page.goto("/")
    _set(page, "#api-key", API_KEY)
    page.wait_for_selector(f"#model-name:has-text('{server.model.name}')")
    page.route("**/v1/chat/completions", answer)

    reply = _ask(page, "Weather and time in Paris?")
    assert reply.get_attribute("data-state") == "done"
    reasoning = reply.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None
    assert reasoning.locator("summary").inner_text() == "Reasoning"
    assert reasoning.locator(".text").is_hidden()
    reasoning.locator("summary").click()
    assert reasoning.locator(".text").inner_text() == "The user wants the weather."
    assert reply.locator(".content").inner_text() == "Let me look."
    calls = reply.locator(".tool-call")
    assert calls.count() == 2
    assert calls.nth(0).locator(".name").inner_text() == "Tool call: get_weather"
    assert json.loads(calls.nth(0).locator("pre").inner_text()) == {"city": "Paris"}
    assert calls.nth(1).locator(".name").inner_text() == "Tool call: get_time"
    assert "tool_calls" in reply.locator(".finish").inner_text()
    _screenshot(page, "chat-page-reasoning.png")

    failed = _ask(page, "Go on")
    assert failed.get_attribute("data-state") == "error"
    error = failed.locator(".error[role=alert]").inner_text()
    assert "the decode worker died" in error and "worker_failed" in error
    assert bodies[1]["messages"][1] == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    }


def test_a_forced_tool_call_is_rendered_as_the_api_gives_it(page: Any, server: Any) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    page.goto("/")
    _set(page, "#api-key", API_KEY)
    _set(page, "#temperature", "0")
    _set(page, "#max-tokens", str(MAX_TOKENS))
    _set(page, "#tools", "[{")
    unparsable = _ask(page, question[0]["content"])
    assert "the tools are not JSON" in unparsable.locator(".error[role=alert]").inner_text()

    _set(page, "#tools", json.dumps([TOOL]))
    page.select_option("#tool-choice", "required")
    _set(page, "#max-tokens", "60")
    with page.expect_request("**/v1/chat/completions") as sent:
        reply = _ask(page, question[0]["content"])
    body = sent.value.post_data_json
    assert (body["tools"], body["tool_choice"], body["messages"]) == ([TOOL], "required", question)
    expected = _api_reply(server, question, tools=[TOOL], tool_choice="required", max_tokens=60)
    (call,) = expected["tool_calls"]
    assert reply.get_attribute("data-state") == "done"
    (shown,) = reply.locator(".tool-call").all()
    assert shown.locator(".name").inner_text() == "Tool call: " + call["function"]["name"]
    assert json.loads(shown.locator("pre").inner_text()) == json.loads(
        call["function"]["arguments"]
    )
    assert reply.locator(".content").inner_text() == (expected["content"] or "")
    assert "tool_calls" in reply.locator(".finish").inner_text()
    _screenshot(page, "chat-page-tool-call.png")


def test_stop_ends_the_reply_and_cancels_it_on_the_server(page: Any, server: Any) -> None:
    def endless(route: Any) -> None:  # a reply that runs until stopped: the model's end ignored
        body = {**route.request.post_data_json, "ignore_eos": True}
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", endless)
    page.goto("/")
    _set(page, "#api-key", API_KEY)
    page.wait_for_selector(f"#model-name:has-text('{server.model.name}')")
    _set(page, "#max-tokens", str(LONG))
    # Greedy: a sampled reply may open a tool call or a thought first and leave no content.
    _set(page, "#temperature", "0")
    page.fill("#prompt", "Tell me a long story")
    page.press("#prompt", "Enter")
    reply = page.locator("li.message.assistant").first
    reply.locator(".content:not(:empty)").wait_for()
    assert server.health().requests_in_flight == 1
    page.click("#stop")
    reply.and_(page.locator("[data-state=done]")).wait_for()
    assert reply.locator(".finish").inner_text() == "finish: stopped"
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    server.wait_idle(timeout=2)
    page.click("#clear")
    assert page.locator("#conversation > li").count() == 0
