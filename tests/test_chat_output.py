"""The parser of Gemma 4 chat outputs: reasoning, content and tool calls, whole and streamed."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from pygemma4.chat_output import (
    ChatOutput,
    ChatOutputDelta,
    ChatOutputStream,
    assemble,
    parse_chat_output,
)

Q = '<|"|>'
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def call(name: str, arguments: str) -> str:
    return f"<|tool_call>call:{name}{{{arguments}}}<tool_call|>"


# (output, in_reasoning, content, reasoning, [(name, arguments as Python value)])
CASES: list[tuple[str, bool, str, str | None, list[tuple[str, object]]]] = [
    # The parsed examples of ../shared/templates/README.md
    (
        "<|channel>thought\nI should multiply.\n<channel|>"
        "<|tool_call>call:multiply{a:3,b:4}<tool_call|><|tool_response>",
        False,
        "",
        "I should multiply.",
        [("multiply", {"a": 3, "b": 4})],
    ),
    (
        f"Let me check. <|tool_call>call:get_weather{{location:{Q}Paris{Q}}}<tool_call|>",
        False,
        "Let me check.",
        None,
        [("get_weather", {"location": "Paris"})],
    ),
    (
        call("f", f"nested:{{inner:{Q}v{Q}}},list:[{Q}a{Q},{Q}b{Q}]"),
        False,
        "",
        None,
        [("f", {"nested": {"inner": "v"}, "list": ["a", "b"]})],
    ),
    (
        call("s", "is_active:true,count:42,score:3.14,note:null"),
        False,
        "",
        None,
        [("s", {"is_active": True, "count": 42, "score": 3.14, "note": None})],
    ),
    (
        call("plan", f'steps:[{{title:{Q}step "one"{Q},done:false}}]'),
        False,
        "",
        None,
        [("plan", {"steps": [{"title": 'step "one"', "done": False}]})],
    ),
    # Plain content, whitespace at the ends
    ("Hello, world!", False, "Hello, world!", None, []),
    ("  \n Hello \n\n world \n ", False, "Hello \n\n world", None, []),
    ("", False, "", None, []),
    ("a < b and c <| d <|x> e <", False, "a < b and c <| d <|x> e <", None, []),
    ('The token <|"|> is a quote here.', False, 'The token <|"|> is a quote here.', None, []),
    ("Grüße 🌍 — ¿qué tal?", False, "Grüße 🌍 — ¿qué tal?", None, []),
    # Reasoning
    (
        "<|channel>thought\nLet me think.<channel|>The answer is 4.",
        False,
        "The answer is 4.",
        "Let me think.",
        [],
    ),
    ("<|channel>thought\n<channel|>Hi!", False, "Hi!", None, []),
    ("<|channel>thought<channel|>Hi!", False, "Hi!", None, []),
    ("<|channel>analysis: x<channel|>y", False, "y", "analysis: x", []),
    (
        "<|channel>thought\nstill thinking when cut off",
        False,
        "",
        "still thinking when cut off",
        [],
    ),
    ("<|channel>thou", False, "", None, []),
    ("Before <|channel>thought\nmid<channel|> after", False, "Before  after", "mid", []),
    (
        "<|channel>thought\none<channel|>A<|channel>thought\ntwo<channel|>B",
        False,
        "AB",
        "onetwo",
        [],
    ),
    # The prompt ended inside an open thought channel
    ("I am reasoning.<channel|>Done.", True, "Done.", "I am reasoning.", []),
    ("only reasoning, never closed", True, "", "only reasoning, never closed", []),
    ("<channel|>", True, "", None, []),
    (
        "Check the tool.<channel|>" + call("look", f"q:{Q}x{Q}"),
        True,
        "",
        "Check the tool.",
        [("look", {"q": "x"})],
    ),
    ("thinking" + call("f", "a:1"), True, "", "thinking", [("f", {"a": 1})]),
    # After a tool result: thought, then the answer or another call
    (
        "<|channel>thought\nThe tool said 21°C.<channel|>It is 21°C in Paris.<turn|>",
        False,
        "It is 21°C in Paris.",
        "The tool said 21°C.",
        [],
    ),
    ("It is sunny.<turn|>ignored after the end", False, "It is sunny.", None, []),
    # Strings hold anything but the quote token
    (
        call("w", f"text:{Q}a, b: {{c}} [d] \\n \\ \"e\" 'f'{Q}"),
        False,
        "",
        None,
        [("w", {"text": "a, b: {c} [d] \\n \\ \"e\" 'f'"})],
    ),
    (
        call("w", f"text:{Q}line 1\nline 2\n\ttab{Q}"),
        False,
        "",
        None,
        [("w", {"text": "line 1\nline 2\n\ttab"})],
    ),
    # ... except other special tokens, which break the call off
    (
        call("w", f"text:{Q}<|channel> and <tool_call|> inside{Q}"),
        False,
        "",
        'and  inside<|"|>}',
        [("w", {"text": ""})],
    ),
    (call("w", f"text:{Q}{Q},empty:{Q}{Q}"), False, "", None, [("w", {"text": "", "empty": ""})]),
    (call("w", f"t:{Q}日本語 🎉 ünïcödé{Q}"), False, "", None, [("w", {"t": "日本語 🎉 ünïcödé"})]),
    (
        call("w", f"html:{Q}<b>bold</b> <|x{Q}"),
        False,
        "",
        None,
        [("w", {"html": "<b>bold</b> <|x"})],
    ),
    # Keys, numbers, lists, nesting
    (
        call("k", f"{Q}quoted key{Q}:1,bare_key:2"),
        False,
        "",
        None,
        [("k", {"quoted key": 1, "bare_key": 2})],
    ),
    (
        call("n", "i:-7,f:-0.5,e:1e-3,E:2.5E+10,z:0"),
        False,
        "",
        None,
        [("n", {"i": -7, "f": -0.5, "e": 0.001, "E": 2.5e10, "z": 0})],
    ),
    (
        call("n", "x:[1,[2,[3,[]]],{}],y:{a:{b:{c:{d:true}}}}"),
        False,
        "",
        None,
        [("n", {"x": [1, [2, [3, []]], {}], "y": {"a": {"b": {"c": {"d": True}}}}})],
    ),
    (call("empty", ""), False, "", None, [("empty", {})]),
    (
        call("ws", f" a : 1 , b :\n[ {Q}x{Q} , 2 ] "),
        False,
        "",
        None,
        [("ws", {"a": 1, "b": ["x", 2]})],
    ),
    (
        call("bare", "unit:celsius,v:1.2.3,t:True"),
        False,
        "",
        None,
        [("bare", {"unit": "celsius", "v": "1.2.3", "t": "True"})],
    ),
    (call("trailing", "a:1,b:[1,2,],"), False, "", None, [("trailing", {"a": 1, "b": [1, 2]})]),
    (call("name.with-dots_1", "a:1"), False, "", None, [("name.with-dots_1", {"a": 1})]),
    # Several calls, content before them, reasoning before them
    (
        call("a", "x:1") + call("b", "y:2") + call("c", ""),
        False,
        "",
        None,
        [("a", {"x": 1}), ("b", {"y": 2}), ("c", {})],
    ),
    (
        "Sure.\n" + call("a", f"q:{Q}1{Q}") + "\n" + call("b", "") + "<|tool_response>junk",
        False,
        "Sure.",
        None,
        [("a", {"q": "1"}), ("b", {})],
    ),
    (
        "<|channel>thought\nTwo lookups.<channel|>On it: " + call("a", "") + call("b", "n:2"),
        False,
        "On it:",
        "Two lookups.",
        [("a", {}), ("b", {"n": 2})],
    ),
    ("<|channel>thought\nno close" + call("f", "a:1"), False, "", "no close", [("f", {"a": 1})]),
    # Malformed calls: degrade, never raise
    ("<|tool_call>", False, "<|tool_call>", None, []),
    ("<|tool_call>call:get_wea", False, "<|tool_call>call:get_wea", None, []),
    ("x <|tool_call>oops{a:1}<tool_call|> y", False, "x <|tool_call>oops{a:1} y", None, []),
    ("<|tool_call>call:{a:1}", False, "<|tool_call>call:{a:1}", None, []),
    ("<|tool_call>call:bad name{}", False, "<|tool_call>call:bad name{}", None, []),
    ("<|tool_call><|tool_call>call:f{}<tool_call|>", False, "<|tool_call>", None, [("f", {})]),
    ("<|tool_call>call:f{a:" + Q + "unterminated", False, "", None, [("f", {"a": "unterminated"})]),
    ("<|tool_call>call:f{a:", False, "", None, [("f", {"a": None})]),
    ("<|tool_call>call:f{a:[1,{b:2", False, "", None, [("f", {"a": [1, {"b": 2}]})]),
    ("<|tool_call>call:f{a:1,b", False, "", None, [("f", {"a": 1})]),
    ("<|tool_call>call:f{a:12", False, "", None, [("f", {"a": 12})]),
    ("<|tool_call>call:f{a:1}", False, "", None, [("f", {"a": 1})]),
    ("<|tool_call>call:f{a:1}} tail", False, "} tail", None, [("f", {"a": 1})]),
    ("<|tool_call>call:f{:1}<tool_call|>", False, ":1}", None, [("f", {})]),
    (
        "<|tool_call>call:f{a:1" + call("g", "b:2"),
        False,
        "",
        None,
        [("f", {"a": 1}), ("g", {"b": 2})],
    ),
    ("<|tool_call>call:f{a:1<tool_call|>after", False, "after", None, [("f", {"a": 1})]),
    ("<|tool_call>call:f{a:" + Q + "x<|tool_response>", False, "", None, [("f", {"a": "x"})]),
    ("<|tool_call>call:f{a:]}<tool_call|>", False, "]}", None, [("f", {"a": None})]),
    ("<|tool_call>call:f{" + Q + "k" + Q + Q + "}", False, '<|"|>}', None, [("f", {})]),
    ("stray <channel|>closers<tool_call|> dropped", False, "stray closers dropped", None, []),
]


def parsed(case: tuple) -> ChatOutput:
    return parse_chat_output(case[0], in_reasoning=case[1])


def streamed(text: str, in_reasoning: bool, cuts: tuple[int, ...]) -> ChatOutput:
    stream = ChatOutputStream(in_reasoning)
    bounds = [0, *cuts, len(text)]
    deltas = [stream.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    return assemble([*deltas, stream.finish()])


def without_ids(output: ChatOutput) -> tuple:
    return output.content, output.reasoning, [(c.name, c.arguments_json) for c in output.tool_calls]


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_parse(case: tuple) -> None:
    _, _, content, reasoning, calls = case
    output = parsed(case)
    assert output.content == content
    assert output.reasoning == reasoning
    assert [(c.name, json.loads(c.arguments_json)) for c in output.tool_calls] == calls
    for c in output.tool_calls:
        assert CALL_ID.fullmatch(c.id)
    assert len({c.id for c in output.tool_calls}) == len(calls)


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_streaming_equals_parsing_at_every_cut(case: tuple) -> None:
    text, in_reasoning = case[0], case[1]
    whole = without_ids(parsed(case))
    positions = range(1, len(text))
    assert without_ids(streamed(text, in_reasoning, tuple(positions))) == whole
    for cut in positions:
        assert without_ids(streamed(text, in_reasoning, (cut,))) == whole
    if len(text) <= 90:
        for cuts in itertools.combinations(positions, 2):
            assert without_ids(streamed(text, in_reasoning, cuts)) == whole


def test_arguments_are_written_as_json_dumps_writes_them() -> None:
    output = parse_chat_output(call("f", f'a:3,b:[{Q}é"{Q},{{c:null}}],d:1e5'))
    assert output.tool_calls[0].arguments_json == '{"a": 3, "b": ["é\\"", {"c": null}], "d": 1e5}'


def test_streamed_deltas_are_openai_shaped() -> None:
    text = "Let me see. " + call("a", f"q:{Q}xy{Q}") + call("b", "n:1")
    stream = ChatOutputStream()
    deltas = [stream.feed(character) for character in text] + [stream.finish()]
    tool_deltas = [d for delta in deltas for d in delta.tool_calls]
    firsts = [d for d in tool_deltas if d.name is not None]
    assert [(d.index, d.name) for d in firsts] == [(0, "a"), (1, "b")]
    assert all(d.id is not None and CALL_ID.fullmatch(d.id) for d in firsts)
    assert all(d.id is None for d in tool_deltas if d.name is None)
    # Each call's first delta comes before its argument fragments, which arrive one by one.
    assert tool_deltas[0].name == "a"
    assert [d.arguments for d in tool_deltas if d.index == 0] == [
        "{",
        '"q": ',
        '"',
        "x",
        "y",
        '"',
        "}",
    ]
    assert stream.calls_started == 2


def test_text_is_emitted_as_soon_as_it_cannot_be_a_special_token() -> None:
    stream = ChatOutputStream()
    assert stream.feed("Hello wor") == ChatOutputDelta(content="Hello wor")
    assert stream.feed("ld <|tool") == ChatOutputDelta(content="ld")
    assert stream.feed("box") == ChatOutputDelta(content=" <|toolbox")
    assert stream.feed("<|chan") == ChatOutputDelta()
    assert stream.feed("nel>thought\nhm") == ChatOutputDelta(reasoning="hm")
    delta = stream.feed("<channel|>ok<|tool_call>call:f{")
    assert (delta.content, delta.reasoning) == ("ok", "")
    [first] = delta.tool_calls
    assert (first.index, first.name, first.arguments) == (0, "f", "{")
    assert first.id is not None and CALL_ID.fullmatch(first.id)
    assert stream.finish().tool_calls[0].arguments == "}"


def test_nothing_is_parsed_after_the_end() -> None:
    stream = ChatOutputStream()
    assert stream.feed("Done.<turn|>") == ChatOutputDelta(content="Done.")
    assert stream.feed("more <|tool_call>call:f{}<tool_call|>").is_empty()
    assert stream.finish().is_empty()


PIECES = [
    "<|channel>",
    "thought\n",
    "<channel|>",
    "<|tool_call>",
    "call:",
    "f",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "a",
    "b:",
    "1",
    "-2.5",
    "true",
    "null",
    " ",
    "\n",
    Q,
    "<tool_call|>",
    "<|",
    "<",
    "|>",
    "text",
    "é🎉",
    "<|tool_response>",
    "<turn|>",
    "call:g{x:",
    Q + "s" + Q,
]


def test_random_outputs_parse_the_same_however_they_are_cut() -> None:
    """Outputs made of the syntax's pieces in random order: never an exception, arguments
    always valid JSON, the same parts at random cuts as whole."""
    generator = random.Random(18)
    for _ in range(600):
        text = "".join(generator.choice(PIECES) for _ in range(generator.randint(0, 24)))
        in_reasoning = generator.random() < 0.2
        whole = parse_chat_output(text, in_reasoning=in_reasoning)
        for c in whole.tool_calls:
            assert isinstance(json.loads(c.arguments_json), dict)
        for _ in range(4):
            cuts = tuple(
                sorted(generator.sample(range(1, max(len(text), 2)), min(3, len(text) // 2)))
            )
            cuts = tuple(c for c in cuts if c < len(text))
            assert without_ids(streamed(text, in_reasoning, cuts)) == without_ids(whole)
