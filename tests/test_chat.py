"""Chat templates: the fixtures' renderings reproduced from the GGUF's own template, live
agreement with Hugging Face `transformers` over a table of conversations and four templates, and
the errors for malformed messages, bad templates and sandbox escapes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from pygemma4 import protocol
from pygemma4.chat import GEMMA4_TEMPLATE, ChatTemplate
from pygemma4.chat_output import parse_chat_output
from pygemma4.errors import ChatTemplateError
from pygemma4.gguf_file import read_gguf
from pygemma4.models.demo import CHAT_TEMPLATE as DEMO_TEMPLATE
from pygemma4.tokenizer import BYTE, CONTROL, Tokenizer
from pygemma4.workers.tokenizer import (
    RequestRefused,
    chat_template_input,
    ends_in_open_channel,
    stop_token_ids,
)

MODELS = ("gemma4-tiny-e", "gemma4-tiny-moe")
SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
GEMMA_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class Point:
    """A dataclass in a message, which transformers hands the template as a dict."""

    x: int
    y: float


def msg(role: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


def text_parts(*texts: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": t} for t in texts]


LONG = "The quick brown fox jumps over the lazy dog. " * 400
MANY_TURNS = [msg("user" if i % 2 == 0 else "assistant", f"turn {i}: {'x' * i}") for i in range(50)]

# Conversations rendered by every template, with and without the generation prompt. Some are
# rejected by some templates (unknown roles, content parts in a template that expects text); the
# error must then be the same as under transformers.
CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single-user": [msg("user", "Hello!")],
    "system-first": [msg("system", "You are terse."), msg("user", "Hi")],
    "system-padded": [msg("system", "  Be brief. \n"), msg("user", "Hi")],
    "system-only": [msg("system", "Just a system prompt.")],
    "no-system-multi-turn": [
        msg("user", "What is 2+2?"),
        msg("assistant", "4"),
        msg("user", "And 3+3?"),
    ],
    "assistant-last": [msg("user", "Say hi."), msg("assistant", "Hi!")],
    "system-assistant-last": [
        msg("system", "sys"),
        msg("user", "q"),
        msg("assistant", "a "),
    ],
    "assistant-first": [msg("assistant", "I start."), msg("user", "ok")],
    "two-users-in-a-row": [msg("user", "one"), msg("user", "two")],
    "many-turns": MANY_TURNS,
    "unicode": [msg("user", "Ünïcödé 🙂\n\nbye — 中文 العربية עברית")],
    "emoji-zwj": [msg("user", "👍🏽 👨‍👩‍👧 🏳️‍🌈"), msg("assistant", "🙂")],
    "combining-and-astral": [msg("user", "e\u0301 \U0001d54f \U00010348")],
    "whitespace-trimmed": [msg("user", "\n\t  padded on both sides  \n\n")],
    "unicode-whitespace": [
        msg("user", "\u3000ideographic space\u00a0"),
        msg("assistant", " \u2003"),
    ],
    "whitespace-only": [msg("user", "   \n\t ")],
    "empty-content": [msg("user", "")],
    "empty-system": [msg("system", ""), msg("user", "")],
    "empty-assistant": [msg("user", "go"), msg("assistant", "")],
    "special-tokens-in-content": [msg("user", "<bos><eos><|turn>user\nfake<turn|>\n<pad><unk>")],
    "turn-markers-in-assistant": [msg("user", "hi"), msg("assistant", "<turn|><|turn>model\n")],
    "jinja-like-text": [
        msg("user", "{{ bos_token }} {% if x %}yes{% endif %} {# note #} {%- raw -%}")
    ],
    "jinja-raise": [msg("user", "{{ raise_exception('no') }}")],
    "quotes-and-backslashes": [msg("user", "\"double\" 'single' \\n \\\\ `tick`")],
    "control-chars": [msg("user", "nul\x00 esc\x1b[31m bell\x07 del\x7f")],
    "crlf": [msg("user", "line1\r\nline2\r\n"), msg("assistant", "\rcr\r")],
    "code-block": [msg("user", "```python\ndef f(x):\n    return {'a': [x]}\n```\n")],
    "long-content": [msg("system", LONG), msg("user", LONG), msg("assistant", LONG)],
    "extra-keys-and-none": [msg("user", "hi", name="alice", tool_calls=None, score=None)],
    "reasoning-fields": [
        msg("user", "2+2?"),
        msg("assistant", "4", reasoning="2 plus 2 is 4"),
        msg("user", "and?"),
        msg("assistant", "done", reasoning_content="r", thinking="t"),
    ],
    "rich-values": [
        msg("user", "values", count=np.int64(3), ratio=np.float32(0.5), flag=np.bool_(False)),
        msg("assistant", "ok", point=Point(1, 2.5), pair=(1, "two")),
    ],
    "content-parts": [msg("user", text_parts(" part one ", "part two ")), msg("assistant", "ok")],
    "content-parts-image": [msg("user", [{"type": "image", "url": "x.png"}, *text_parts("what?")])],
    "system-in-middle": [msg("user", "hi"), msg("system", "late"), msg("user", "there")],
    "tool-role": [msg("user", "weather?"), msg("tool", '{"temp": 21}')],
    "unknown-role": [msg("developer", "be nice"), msg("user", "hi")],
    "role-case": [msg("User", "capitalised role")],
}

# Exercises the environment: tojson and its options, tools and documents (None when not given),
# loops with loop.first / loop.last / loop.index, break and continue, namespace(), dict(), the
# generation block, default(), the special tokens, and the extra kwarg enable_thinking.
ENVIRONMENT_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(users=0, last_user=-1) %}
{% for m in messages %}
{% if m.role == 'user' %}
{% set ns.users = ns.users + 1 %}
{% set ns.last_user = loop.index0 %}
{% endif %}
{% endfor %}
{% if tools is not none %}
<tools>
{% for tool in tools %}
{{ tool | tojson(indent=2, sort_keys=True) }}{% if not loop.last %},{% endif %}

{% endfor %}
</tools>
{% endif %}
{% if documents %}
{% for d in documents %}
[doc {{ loop.index }}: {{ d.title }}] {{ d.text | tojson }}
{% endfor %}
{% endif %}
{% for m in messages %}
    {% if m.role == 'tool' %}{% continue %}{% endif %}
    {% if m.role == 'developer' %}{% break %}{% endif %}
<{{ m.role }}{% if loop.first %} first{% endif %}{% if loop.last %} last{% endif %}>
{{ m | tojson(separators=(',', ':')) }}
{% if m.role == 'assistant' %}
{% generation %}{{ m.content if m.content is string
    else m.content | map(attribute='text') | join('|') }}{% endgeneration %}
{% endif %}
{% endfor %}
users={{ ns.users }} last_user={{ ns.last_user }} d={{ dict(b=[1, 2], a='é')
    | tojson(sort_keys=true) }}
{{ dict.fromkeys(['k'], 0) | tojson }} thinking={{ enable_thinking | default('unset') }}
tools_defined={{ tools is defined }} documents_none={{ documents is none }} eos={{ eos_token }}
{% if add_generation_prompt %}<assistant>{% if enable_thinking %}<think>{% endif %}{% endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter für einen Ort 🌦",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "description": "does nothing"}},
]
DOCUMENTS = [{"title": "Doc A", "text": 'alpha "quoted"'}, {"title": "Dök B", "text": "beta"}]
ENVIRONMENT_KWARGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "tools": {"tools": TOOLS},
    "documents": {"documents": DOCUMENTS},
    "thinking-on": {"enable_thinking": True},
    "everything": {"enable_thinking": False, "tools": TOOLS, "documents": DOCUMENTS},
    "override-token": {"bos_token": "[BOS]", "eos_token": ""},
    "rich-kwarg": {"enable_thinking": np.bool_(True), "tools": tuple(TOOLS)},
}


def gguf_chat_setup(path: Path) -> tuple[str, dict[str, str]]:
    """The chat template of the GGUF at `path` and its special tokens' texts."""
    metadata = read_gguf(path).metadata
    tokens = metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list)
    special = {name: str(tokens[int(metadata[key])]) for name, key in SPECIAL_TOKEN_KEYS.items()}  # type: ignore[call-overload]
    template = metadata["tokenizer.chat_template"]
    assert isinstance(template, str)
    return template, special


@pytest.fixture(scope="session")
def gguf_setup(fixtures_dir: Path) -> tuple[str, dict[str, str]]:
    return gguf_chat_setup(fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf")


@pytest.fixture(scope="session")
def hf_tokenizer(fixtures_dir: Path) -> Any:
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed: no live comparison"
    )
    return transformers.AutoTokenizer.from_pretrained(fixtures_dir / "gemma4-tiny-e")


@pytest.fixture(scope="session")
def templates(gguf_setup: tuple[str, dict[str, str]]) -> dict[str, str]:
    return {
        "gguf": gguf_setup[0],
        "builtin": GEMMA4_TEMPLATE,
        "demo": DEMO_TEMPLATE,
        "environment": ENVIRONMENT_TEMPLATE,
    }


def hf_render(tokenizer: Any, template: str, messages: Any, agp: bool, **kwargs: Any) -> Any:
    """transformers' rendering, or the exception it raised."""
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=agp,
            chat_template=template,
            **kwargs,
        )
    except Exception as e:
        return e


def our_render(template: ChatTemplate, messages: Any, agp: bool, **kwargs: Any) -> Any:
    try:
        return template.render(messages, add_generation_prompt=agp, **kwargs)
    except ChatTemplateError as e:
        return e


def assert_same(ours: Any, theirs: Any) -> None:
    """Equal text, or both failed with transformers' message inside ours."""
    if isinstance(theirs, BaseException):
        assert isinstance(ours, ChatTemplateError), (
            f"transformers raised {theirs!r}, we gave {ours!r}"
        )
        assert str(theirs) in str(ours)
    else:
        assert not isinstance(ours, BaseException), (
            f"we raised {ours!r}, transformers gave {theirs!r}"
        )
        assert ours == theirs


# --- the fixtures' own renderings -------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_fixture_renderings_from_the_gguf_template(fixtures_dir: Path, model: str) -> None:
    template, special = gguf_chat_setup(fixtures_dir / model / "model-Q8_0.gguf")
    assert special["bos_token"] == "<bos>"
    ref = np.load(fixtures_dir / model / "ref.npz")
    chats = json.loads(str(ref["chats"]))
    expected = json.loads(str(ref["chat_rendered"]))
    assert len(chats) == len(expected) == 3
    chat = ChatTemplate(template, special)
    assert chat.source == template
    for messages, rendered in zip(chats, expected, strict=True):
        assert chat.render(messages, add_generation_prompt=True) == rendered


def test_builtin_template_matches_the_gguf_template(gguf_setup: tuple[str, dict[str, str]]) -> None:
    """On text-only conversations the built-in template is the fixture models' template."""
    gguf = ChatTemplate(*gguf_setup)
    builtin = ChatTemplate(GEMMA4_TEMPLATE, gguf_setup[1])
    for name, messages in CONVERSATIONS.items():
        if not all(isinstance(m["content"], str) for m in messages):
            continue
        for agp in (True, False):
            expected, got = our_render(gguf, messages, agp), our_render(builtin, messages, agp)
            if isinstance(expected, ChatTemplateError):
                assert isinstance(got, ChatTemplateError), name
                assert str(got) == str(expected), name
            else:
                assert got == expected, name


def test_builtin_template_format() -> None:
    chat = ChatTemplate(GEMMA4_TEMPLATE, GEMMA_TOKENS)
    messages = [
        msg("system", "  sys \n"),
        msg("user", " hi "),
        msg("assistant", text_parts(" hel", "lo ")),
    ]
    assert chat.render(messages, add_generation_prompt=False) == (
        "<bos><|turn>system\nsys<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\nhello<turn|>\n"
    )
    assert chat.render([msg("user", "q")]) == "<bos><|turn>user\nq<turn|>\n<|turn>model\n"
    with pytest.raises(ChatTemplateError, match=r"^Unsupported role: tool$"):
        chat.render([msg("user", "q"), msg("tool", "x")])
    with pytest.raises(ChatTemplateError, match=r"^Unsupported content part type: image$"):
        chat.render([msg("user", [{"type": "image"}])])


# --- live agreement with transformers ---------------------------------------------------------


def test_special_tokens_agree_with_transformers(
    hf_tokenizer: Any, gguf_setup: tuple[str, dict[str, str]]
) -> None:
    assert hf_tokenizer.special_tokens_map == gguf_setup[1]


@pytest.mark.parametrize("agp", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template_name", ["gguf", "builtin", "demo", "environment"])
def test_matches_transformers(
    hf_tokenizer: Any,
    templates: dict[str, str],
    gguf_setup: tuple[str, dict[str, str]],
    template_name: str,
    conversation: str,
    agp: bool,
) -> None:
    source, messages = templates[template_name], CONVERSATIONS[conversation]
    ours = our_render(ChatTemplate(source, gguf_setup[1]), messages, agp)
    assert_same(ours, hf_render(hf_tokenizer, source, messages, agp))


@pytest.mark.parametrize("kwargs_name", list(ENVIRONMENT_KWARGS))
def test_environment_matches_transformers(
    hf_tokenizer: Any, gguf_setup: tuple[str, dict[str, str]], kwargs_name: str
) -> None:
    kwargs = ENVIRONMENT_KWARGS[kwargs_name]
    chat = ChatTemplate(ENVIRONMENT_TEMPLATE, gguf_setup[1])
    for name, messages in CONVERSATIONS.items():
        for agp in (True, False):
            ours = our_render(chat, messages, agp, **kwargs)
            theirs = hf_render(hf_tokenizer, ENVIRONMENT_TEMPLATE, messages, agp, **kwargs)
            assert not isinstance(theirs, BaseException), (name, theirs)
            assert_same(ours, theirs)


def test_environment_template_really_uses_the_features(
    gguf_setup: tuple[str, dict[str, str]],
) -> None:
    """Guards the live comparison against a template that silently renders nothing useful."""
    chat = ChatTemplate(ENVIRONMENT_TEMPLATE, gguf_setup[1])
    text = chat.render(
        CONVERSATIONS["reasoning-fields"], tools=TOOLS, documents=DOCUMENTS, enable_thinking=True
    )
    assert text.startswith("<bos>")
    assert '"description": "Wetter für einen Ort 🌦"' in text  # indent=2, no \\u escapes
    assert "[doc 2: Dök B]" in text
    assert '"thinking":"2 plus 2 is 4"' in text  # reasoning aliased, compact separators
    assert "<user first>" in text and "<assistant last>" in text
    assert "users=2 last_user=2" in text
    assert 'd={"a": "é", "b": [1, 2]}' in text
    assert "thinking=True" in text and text.endswith("<assistant><think>")
    plain = chat.render(CONVERSATIONS["tool-role"], add_generation_prompt=False)
    assert "tools_defined=True documents_none=True" in plain and "thinking=unset" in plain
    assert "<tool" not in plain  # {% continue %}


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ strftime_now.__globals__['os'] }}",
        "{{ raise_exception.__code__.co_code }}",
        "{{ dict.__call__.__globals__ }}",
        "{% set x = [] %}{{ x.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{% set ns = namespace(_hidden=1) %}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_sandbox_refuses(hf_tokenizer: Any, source: str) -> None:
    messages = [msg("user", "hi")]
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, GEMMA_TOKENS).render(messages)
    assert isinstance(hf_render(hf_tokenizer, source, messages, True), Exception)


# --- errors -----------------------------------------------------------------------------------


def test_unknown_role_carries_the_templates_message(
    gguf_setup: tuple[str, dict[str, str]],
) -> None:
    chat = ChatTemplate(*gguf_setup)
    with pytest.raises(ChatTemplateError) as info:
        chat.render([msg("user", "hi"), msg("tool", "x")])
    assert str(info.value) == "Unsupported role: tool"


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "messages must be a list of message mappings, not str"),
        ({"role": "user", "content": "x"}, "not dict"),
        (None, "not NoneType"),
        (42, "not int"),
        ([], "messages is empty"),
        ((), "messages is empty"),
        ([msg("user", "a"), "b"], "message 1 is not a mapping (got str)"),
        ([msg("user", "a"), None], "message 1 is not a mapping (got NoneType)"),
        ([{"content": "a"}], "message 0 has no 'role'"),
        ([msg("user", "a"), msg("assistant", "b"), {"content": "c"}], "message 2 has no 'role'"),
        ([{"role": None, "content": "a"}], "message 0 has no 'role'"),
        ([{"role": 1, "content": "a"}], "message 0 has a 'role' of type int"),
        ([{"role": "user"}], "message 0 has no 'content'"),
        ([msg("user", "a"), msg("user", None)], "message 1 has no 'content'"),
        ([msg("user", 42)], "message 0 has a 'content' of type int"),
        ([msg("user", b"bytes")], "message 0 has a 'content' of type bytes"),
        ([msg("user", {"type": "text", "text": "x"})], "message 0 has a 'content' of type dict"),
        ([msg("user", ["hi"])], "message 0 content part 0 is not a mapping (got str)"),
        ([msg("user", [{"text": "hi"}])], "message 0 content part 0 has no str 'type'"),
    ],
)
def test_malformed_messages(messages: Any, problem: str) -> None:
    chat = ChatTemplate(GEMMA4_TEMPLATE, GEMMA_TOKENS)
    with pytest.raises(ChatTemplateError) as info:
        chat.render(messages)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"tools": "get_weather"}, "tools must be a list of mappings, not str"),
        ({"tools": [TOOLS[0], 3]}, "tool 1 is not a mapping (got int)"),
        ({"documents": {"title": "x"}}, "documents must be a list of mappings, not dict"),
        ({"documents": ["text"]}, "document 0 is not a mapping (got str)"),
        ({"continue_final_message": True}, "continue_final_message is not supported"),
    ],
)
def test_malformed_arguments(kwargs: dict[str, Any], problem: str) -> None:
    chat = ChatTemplate(ENVIRONMENT_TEMPLATE, GEMMA_TOKENS)
    with pytest.raises(ChatTemplateError, match=re.escape(problem)):
        chat.render([msg("user", "hi")], **kwargs)


@pytest.mark.parametrize(
    ("source", "line", "problem"),
    [
        ("{% if messages %}", 1, "Unexpected end of template"),
        ("a\nb\n{{ bos_token }", 3, "unexpected '}'"),
        ("{% for m in messages %}\n{{ m }}\n", 2, "endfor"),
        ("\n{{ messages | no_such_filter }}", 2, "No filter named 'no_such_filter'"),
        ("{% do messages.append(1) %}", 1, "unknown tag 'do'"),
        ("{% generation %}x", 1, "endgeneration"),
        ("{% endif %}", 1, "endif"),
    ],
)
def test_syntax_error_at_construction(source: str, line: int, problem: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source)
    text = str(info.value)
    assert f"line {line}" in text and problem in text, text


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ChatTemplateError, match="must be a str, not bytes"):
        ChatTemplate(b"{{ bos_token }}")  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match="bos_token"):
        ChatTemplate("x", {"bos_token": 2})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("source", "line", "problem"),
    [
        ("ok\n{{ nothing.attr }}", 2, "'nothing' is undefined"),
        ("{{ 1 + messages[0].content }}", 1, "TypeError: unsupported operand type(s)"),
        ("\n\n{{ messages[5].role }}", 3, "has no element 5"),
        ("{{ 1 / 0 }}", 1, "ZeroDivisionError"),
        ("{{ nothing | tojson }}", 1, "TypeError: Object of type Undefined is not JSON"),
        ("{{ strftime_now(3) }}", 1, "TypeError"),
    ],
)
def test_errors_inside_the_template(source: str, line: int, problem: str) -> None:
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source).render([msg("user", "hi")])
    text = str(info.value)
    assert f"line {line}" in text and problem in text, text


def test_raise_exception_message_is_kept_exactly() -> None:
    chat = ChatTemplate("x\n{{ raise_exception('Only user/assistant, got ' ~ messages[0].role) }}")
    with pytest.raises(ChatTemplateError) as info:
        chat.render([msg("tool", "hi")])
    assert str(info.value) == "Only user/assistant, got tool"


def test_messages_are_not_changed() -> None:
    messages = [msg("user", "q"), msg("assistant", "a", reasoning="r", extra=None)]
    snapshot = json.dumps(messages)
    ChatTemplate(ENVIRONMENT_TEMPLATE, GEMMA_TOKENS).render(messages)
    assert json.dumps(messages) == snapshot


def test_special_tokens_are_optional_and_overridable() -> None:
    source = "[{{ bos_token }}|{{ eos_token }}|{{ extra }}]"
    assert ChatTemplate(source).render([msg("user", "x")]) == "[||]"
    chat = ChatTemplate(source, GEMMA_TOKENS)
    assert chat.render([msg("user", "x")]) == "[<bos>|<eos>|]"
    assert chat.render([msg("user", "x")], bos_token="", extra=7) == "[|<eos>|7]"


def test_trailing_newline_of_the_template_is_dropped() -> None:
    """Jinja's default, which transformers keeps: one final newline of the source is not output."""
    assert ChatTemplate("{{ bos_token }}\n", GEMMA_TOKENS).render([msg("user", "x")]) == "<bos>"
    assert ChatTemplate("a\n\n").render([msg("user", "x")]) == "a\n"


@pytest.mark.parametrize(
    "source",
    [
        "{{ bos_token }}\n",
        "{{ bos_token }}\n\n",
        "a\n\n",
        "  {% if add_generation_prompt %}\n  gen\n  {% endif %}\n",
        "{% for m in messages %}\n  {{ m.content }}  \n{% endfor %}\n\n",
        "{%- for m in messages -%}\n {{- m.content -}} \n{%- endfor %} end \n",
        "{% raw %}{{ not jinja }}{% endraw %}\n{# comment #}\n{{ messages | length }}",
    ],
)
def test_whitespace_handling_matches_transformers(hf_tokenizer: Any, source: str) -> None:
    messages = [msg("user", " one "), msg("assistant", "two\n")]
    for agp in (True, False):
        ours = our_render(ChatTemplate(source, GEMMA_TOKENS), messages, agp)
        assert_same(ours, hf_render(hf_tokenizer, source, messages, agp))


def test_strftime_now_renders_the_current_date() -> None:
    chat = ChatTemplate("{{ strftime_now('%Y') }}|{{ strftime_now('%d %B %Y') }}")
    before = datetime.now()
    year, date = chat.render([msg("user", "x")]).split("|")
    after = datetime.now()
    assert year in {before.strftime("%Y"), after.strftime("%Y")}
    assert int(year) >= 2024
    days = {(before + timedelta(days=d)).strftime("%d %B %Y") for d in (-1, 0, 1)}
    assert date in days


# --- OpenAI-shaped chats (tools, tool results, reasoning) through the official templates -------

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "shared" / "templates"
OFFICIAL_TEMPLATES = sorted(p.name for p in TEMPLATES_DIR.glob("*.jinja"))


def official_template(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text()


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city."},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city"],
        },
    },
}
CALL_ARGUMENTS: dict[str, Any] = {"city": 'Paris "centre"', "days": 3, "opts": {"hourly": True}}
TOOL_CHAT: list[dict[str, Any]] = [
    {"role": "developer", "content": "Use the tools."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "I should ask the tool.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(CALL_ARGUMENTS)},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
]


def tool_chat_request(thinking: bool, messages: list[dict[str, Any]] = TOOL_CHAT) -> Any:
    return protocol.Chat(
        id=1,
        messages=[msgspec.convert(m, protocol.ChatMessage) for m in messages],
        tools=[msgspec.convert(WEATHER_TOOL, protocol.ToolDefinition)],
        chat_template_kwargs={"enable_thinking": thinking},
    )


def test_openai_messages_become_what_gemma4_templates_read() -> None:
    messages, variables = chat_template_input(tool_chat_request(True))
    assert variables == {"enable_thinking": True, "tools": [WEATHER_TOOL]}
    assert messages == [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should ask the tool.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": CALL_ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]


@pytest.mark.parametrize("thinking", [False, True], ids=["no-thinking", "thinking"])
@pytest.mark.parametrize("name", OFFICIAL_TEMPLATES)
def test_tool_chats_render_as_transformers_renders_them(
    hf_tokenizer: Any, gguf_setup: tuple[str, dict[str, str]], name: str, thinking: bool
) -> None:
    source = official_template(name)
    messages, variables = chat_template_input(tool_chat_request(thinking))
    ours = our_render(ChatTemplate(source, gguf_setup[1]), messages, True, **variables)
    assert_same(ours, hf_render(hf_tokenizer, source, messages, True, **variables))
    assert isinstance(ours, str)
    assert "<|tool>declaration:get_weather{" in ours
    # The launch revision wrote tool results as a turn of their own.
    tool_result = (
        "<|turn>tool\n21 C, sunny<turn|>"
        if "2026-04-02" in name
        else '<|tool_response>response:get_weather{value:<|"|>21 C, sunny<|"|>}'
    )
    assert tool_result in ours
    assert ("<|think|>" in ours) == thinking


@pytest.mark.parametrize("name", OFFICIAL_TEMPLATES)
def test_a_rendered_tool_call_parses_back_to_the_call(
    gguf_setup: tuple[str, dict[str, str]], name: str
) -> None:
    """What the templates write for a past call is what the model writes, so the parser reads
    it back to the same call."""
    messages, variables = chat_template_input(tool_chat_request(False))
    rendered = ChatTemplate(official_template(name), gguf_setup[1]).render(messages, **variables)
    match = re.search(r"<\|tool_call>.*?<tool_call\|>", rendered, re.DOTALL)
    assert match is not None
    [call] = parse_chat_output(match.group(0)).tool_calls
    assert (call.name, json.loads(call.arguments_json)) == ("get_weather", CALL_ARGUMENTS)


def test_chat_template_kwargs_cannot_replace_request_fields() -> None:
    request = tool_chat_request(False)
    request.chat_template_kwargs = {"tools": [], "add_generation_prompt": False}
    with pytest.raises(RequestRefused, match="tools, add_generation_prompt"):
        chat_template_input(request)


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ({"role": "user"}, r"messages\[0\] has no content"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
            r"messages\[0\].tool_calls\[0\].function.arguments is not JSON",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
            r"messages\[0\].tool_calls\[0\].function.arguments is not a JSON object",
        ),
    ],
)
def test_bad_openai_messages_are_refused(message: dict[str, Any], problem: str) -> None:
    with pytest.raises(RequestRefused, match=problem):
        chat_template_input(tool_chat_request(False, [message]))


def special_token_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with Gemma 4's reasoning and tool tokens."""
    specials = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
    specials += ["<|tool_response>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    types = [CONTROL] * len(specials) + [BYTE] * 256
    return Tokenizer(tokens, types, [], bos_id=2, eos_id=1)


@pytest.mark.parametrize(
    ("prompt", "open_channel"),
    [
        ("<|turn>user\nHi<turn|>\n<|turn>model\n", False),
        ("<|turn>model\n<|channel>thought\n", True),
        ("<|turn>model\n<|channel>thought\n<channel|>", False),
        ("<|channel>thought\nA<channel|>B<|tool_response>x<|channel>thought\n", True),
        ("<|channel>thought\n<channel|>text <|channel> literal? no: a token", True),
    ],
)
def test_a_prompt_ending_inside_a_thought_channel_is_seen(prompt: str, open_channel: bool) -> None:
    tokenizer = special_token_tokenizer()
    assert ends_in_open_channel(tokenizer, tokenizer.encode(prompt)) is open_channel


def test_a_chat_with_tools_stops_at_the_tool_response_token() -> None:
    tokenizer = special_token_tokenizer()
    base = set(tokenizer.end_of_generation_ids)
    tool_response = tokenizer.token_id("<|tool_response>")
    assert tool_response is not None and tool_response not in base
    assert stop_token_ids(tokenizer, tool_chat_request(False)) == base | {tool_response}
    without_tools = protocol.Chat(id=1, messages=[protocol.ChatMessage(role="user", content="hi")])
    assert stop_token_ids(tokenizer, without_tools) == base
