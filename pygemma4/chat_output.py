"""What a Gemma 4 chat model generated, as OpenAI's parts: content, reasoning, tool calls.

The input is the generated text with the special tokens kept as their texts. The model writes
    [<|channel>thought\\nREASONING<channel|>] [CONTENT] {<|tool_call>call:NAME{ARGS}<tool_call|>}
and then `<|tool_response>` or `<turn|>`, which end the output (whatever follows is dropped).
ARGS are `key:value` pairs; a value is `<|"|>raw text<|"|>`, `{ARGS}`, `[values]`, a number,
`true`, `false` or `null` (a bare word that is none of these is taken as a string). Keys are bare
or quoted with `<|"|>`. The arguments become JSON as `json.dumps` writes it.

Parsing is one incremental machine (`ChatOutputStream`), so what it streams adds up to
`parse_chat_output` for every way the text is cut into pieces. It never raises on what the
model wrote:
- `<|tool_call>` not followed by `call:NAME{` is kept as content, literally;
- a call that breaks off after `call:NAME{` (bad syntax, another special token, the end of the
  text) stays a call whose arguments are closed as valid JSON holding what was parsed; the text
  from where it broke is read as content again;
- stray closing tokens (`<channel|>` outside a channel, `<tool_call|>` outside a call) are
  dropped; `<|"|>` outside a call is literal text;
- reasoning and content are stripped of whitespace at their ends (as one text each);
- `<|tool_call>` inside a thought channel ends the channel and starts the call.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
CALL_OPEN = "<|tool_call>"
CALL_CLOSE = "<tool_call|>"
QUOTE = '<|"|>'
TOOL_RESPONSE = "<|tool_response>"
TURN_END = "<turn|>"
THOUGHT_LABEL = "thought\n"
_MARKERS = (CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE, QUOTE, TOOL_RESPONSE, TURN_END)
_END_MARKERS = (TOOL_RESPONSE, TURN_END)
_CALL_PREFIX = "call:"
_NAME_CHARACTER = re.compile(r"[\w.\-]")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


@dataclass(frozen=True)
class ToolCall:
    """One complete tool call; `arguments_json` is a JSON object's text."""

    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class ChatOutput:
    """A whole output's parts; `reasoning` is None when the model did not reason."""

    content: str
    reasoning: str | None
    tool_calls: list[ToolCall]


@dataclass(frozen=True)
class ToolCallDelta:
    """What a piece of output added to the tool call `index` (counted from 0 in the output):
    its first delta carries `id` and `name`, the later ones only `arguments` fragments."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ChatOutputDelta:
    """What a piece of output added to each part."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def is_empty(self) -> bool:
        """Whether it adds nothing."""
        return not (self.content or self.reasoning or self.tool_calls)


def new_call_id() -> str:
    """A fresh tool call id in OpenAI's style."""
    return "call_" + secrets.token_hex(12)


def parse_chat_output(
    text: str, *, in_reasoning: bool = False, call_id: Callable[[], str] = new_call_id
) -> ChatOutput:
    """The parts of a whole output; `in_reasoning` when the prompt ended inside an open thought
    channel (so the output starts as reasoning)."""
    stream = ChatOutputStream(in_reasoning, call_id=call_id)
    return assemble([stream.feed(text), stream.finish()])


def assemble(deltas: list[ChatOutputDelta]) -> ChatOutput:
    """The output that a sequence of deltas adds up to."""
    content = "".join(d.content for d in deltas)
    reasoning = "".join(d.reasoning for d in deltas)
    ids: list[str] = []
    names: list[str] = []
    arguments: list[list[str]] = []
    for delta in (d for each in deltas for d in each.tool_calls):
        if delta.index == len(ids):
            ids.append(delta.id or "")
            names.append(delta.name or "")
            arguments.append([])
        arguments[delta.index].append(delta.arguments)
    calls = [ToolCall(i, n, "".join(a)) for i, n, a in zip(ids, names, arguments, strict=True)]
    return ChatOutput(content, reasoning or None, calls)


class _Mode(enum.Enum):
    CONTENT = enum.auto()
    LABEL = enum.auto()  # after <|channel>, reading the channel's label
    REASONING = enum.auto()
    CALL_PREFIX = enum.auto()  # after <|tool_call>, reading `call:NAME{`
    ARGUMENTS = enum.auto()
    ENDED = enum.auto()


class _Expect(enum.Enum):
    """Where the arguments' reader stands."""

    KEY_OR_CLOSE = enum.auto()  # in an object, after `{` or `,`
    BARE_KEY = enum.auto()
    QUOTED_KEY = enum.auto()
    COLON = enum.auto()
    VALUE = enum.auto()  # after `key:`
    VALUE_OR_CLOSE = enum.auto()  # in a list, after `[` or `,`
    STRING = enum.auto()
    BARE_VALUE = enum.auto()
    COMMA_OR_CLOSE = enum.auto()
    CALL_CLOSE = enum.auto()  # the outermost object closed


class _StrippedText:
    """One part's text, emitted without the whitespace at its two ends: leading whitespace is
    dropped, trailing whitespace held back until more text follows it."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def add(self, text: str) -> str:
        """What of `text` can be emitted now."""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        return body


class ChatOutputStream:
    """Parses an output piece by piece: `feed` each piece of text as it is generated, then
    `finish` once. Text is emitted as soon as it cannot be the start of a special token."""

    def __init__(
        self, in_reasoning: bool = False, *, call_id: Callable[[], str] = new_call_id
    ) -> None:
        self._call_id = call_id
        self._mode = _Mode.REASONING if in_reasoning else _Mode.CONTENT
        self._pending = ""
        self._content = _StrippedText()
        self._reasoning = _StrippedText()
        self._delta = ChatOutputDelta()
        self._calls = 0
        self._buffer = ""  # the label, call prefix, key or bare value being read
        self._stack: list[str] = []  # the closing brackets of the open containers
        self._expect = _Expect.KEY_OR_CLOSE
        self._comma = False  # a `,` was read and its separator not yet written

    @property
    def calls_started(self) -> int:
        """How many tool calls have started so far."""
        return self._calls

    def feed(self, text: str) -> ChatOutputDelta:
        """What `text`, appended to the output, adds."""
        if self._mode is not _Mode.ENDED:
            self._pending += text
        self._run(final=False)
        return self._take_delta()

    def finish(self) -> ChatOutputDelta:
        """What the end of the output adds (text held back, calls broken off)."""
        self._run(final=True)
        if self._mode is _Mode.LABEL:
            self._mode = _Mode.REASONING
        elif self._mode is _Mode.CALL_PREFIX:
            self._fail_prefix("")
        elif self._mode is _Mode.ARGUMENTS:
            self._break_call("")
        self._mode = _Mode.ENDED
        return self._take_delta()

    def _take_delta(self) -> ChatOutputDelta:
        delta, self._delta = self._delta, ChatOutputDelta()
        return delta

    # --- Cutting the text into special tokens and plain runs ---------------------------------

    def _run(self, final: bool) -> None:
        while self._pending and self._mode is not _Mode.ENDED:
            piece = self._next_piece(final)
            if piece is None:
                return
            marker, text = piece
            if marker:
                self._on_marker(text)
            else:
                self._on_text(text)

    def _next_piece(self, final: bool) -> tuple[bool, str] | None:
        """The next special token (True, its text) or run of plain text (False, the run) at the
        front of the pending text, taken off it; None when what is pending may still become a
        special token."""
        pending = self._pending
        start = pending.find("<")
        if start == 0:
            for marker in _MARKERS:
                if pending.startswith(marker):
                    self._pending = pending[len(marker) :]
                    return True, marker
            if not final and any(len(pending) < len(m) and m.startswith(pending) for m in _MARKERS):
                return None
            start = pending.find("<", 1)
        end = len(pending) if start < 0 else start
        self._pending = pending[end:]
        return False, pending[:end]

    def _push_back(self, text: str) -> None:
        self._pending = text + self._pending

    # --- Modes -------------------------------------------------------------------------------

    def _on_marker(self, marker: str) -> None:
        mode = self._mode
        if mode is _Mode.LABEL:
            self._buffer = ""
            self._mode = _Mode.REASONING
            self._push_back(marker)
        elif mode is _Mode.CALL_PREFIX:
            self._fail_prefix(marker)
        elif mode is _Mode.ARGUMENTS:
            self._arguments_marker(marker)
        elif marker in _END_MARKERS:
            self._mode = _Mode.ENDED
        elif marker == CHANNEL_OPEN:
            self._mode = _Mode.LABEL
        elif marker == CALL_OPEN:
            self._mode = _Mode.CALL_PREFIX
        elif marker == QUOTE:
            self._on_text(marker)
        elif marker == CHANNEL_CLOSE:
            self._mode = _Mode.CONTENT
        # else a stray CALL_CLOSE, dropped

    def _on_text(self, text: str) -> None:
        mode = self._mode
        if mode is _Mode.CONTENT:
            self._delta.content += self._content.add(text)
        elif mode is _Mode.REASONING:
            self._delta.reasoning += self._reasoning.add(text)
        elif mode is _Mode.LABEL:
            self._label_text(text)
        elif mode is _Mode.CALL_PREFIX:
            self._prefix_text(text)
        else:
            self._arguments_text(text)

    def _label_text(self, text: str) -> None:
        label = self._buffer + text
        if THOUGHT_LABEL.startswith(label):
            self._buffer = label
            return
        self._buffer = ""
        self._mode = _Mode.REASONING
        if label.startswith(THOUGHT_LABEL):
            self._push_back(label[len(THOUGHT_LABEL) :])
        else:
            # Not the thought label: what was read is the reasoning itself.
            self._delta.reasoning += self._reasoning.add(label)

    def _prefix_text(self, text: str) -> None:
        for position, character in enumerate(text):
            prefix = self._buffer
            if len(prefix) < len(_CALL_PREFIX):
                fits = character == _CALL_PREFIX[len(prefix)]
            elif character == "{" and len(prefix) > len(_CALL_PREFIX):
                self._start_call(prefix[len(_CALL_PREFIX) :])
                self._arguments_text(text[position + 1 :])
                return
            else:
                fits = bool(_NAME_CHARACTER.fullmatch(character))
            if not fits:
                self._fail_prefix(text[position:])
                return
            self._buffer += character

    def _fail_prefix(self, rest: str) -> None:
        """`<|tool_call>` did not start a call: it and what was read after it are content."""
        self._mode = _Mode.CONTENT
        self._delta.content += self._content.add(CALL_OPEN + self._buffer)
        self._buffer = ""
        self._push_back(rest)

    def _start_call(self, name: str) -> None:
        self._delta.tool_calls.append(ToolCallDelta(self._calls, self._call_id(), name, ""))
        self._calls += 1
        self._buffer = ""
        self._mode = _Mode.ARGUMENTS
        self._stack = ["}"]
        self._expect = _Expect.KEY_OR_CLOSE
        self._comma = False
        self._emit("{")

    # --- The arguments -----------------------------------------------------------------------

    def _emit(self, fragment: str) -> None:
        calls = self._delta.tool_calls
        index = self._calls - 1
        if calls and calls[-1].index == index:
            last = calls[-1]
            calls[-1] = ToolCallDelta(index, last.id, last.name, last.arguments + fragment)
        else:
            calls.append(ToolCallDelta(index, None, None, fragment))

    def _emit_item(self, fragment: str) -> None:
        """Write a key or a value, after the separator a `,` before it calls for."""
        if self._comma:
            self._comma = False
            fragment = ", " + fragment
        self._emit(fragment)

    def _arguments_marker(self, marker: str) -> None:
        expect = self._expect
        if marker == QUOTE and expect is _Expect.KEY_OR_CLOSE:
            self._expect = _Expect.QUOTED_KEY
        elif marker == QUOTE and expect is _Expect.QUOTED_KEY:
            self._expect = _Expect.COLON
        elif marker == QUOTE and expect in (_Expect.VALUE, _Expect.VALUE_OR_CLOSE):
            self._emit_item('"')
            self._expect = _Expect.STRING
        elif marker == QUOTE and expect is _Expect.STRING:
            self._emit('"')
            self._after_value()
        elif marker == CALL_CLOSE and expect is _Expect.CALL_CLOSE:
            self._mode = _Mode.CONTENT
        else:
            self._break_call(marker)

    def _arguments_text(self, text: str) -> None:
        for position, character in enumerate(text):
            if self._expect is _Expect.STRING:
                # Raw text up to the closing quote, which is a special token: all of the run.
                self._emit(json.dumps(text[position:], ensure_ascii=False)[1:-1])
                return
            if not self._arguments_character(character):
                self._break_call(text[position:])
                return

    def _arguments_character(self, character: str) -> bool:
        """Read one character of the arguments; False when it does not fit where it is."""
        expect = self._expect
        if expect in (_Expect.BARE_KEY, _Expect.QUOTED_KEY):
            if expect is _Expect.BARE_KEY and character == ":":
                self._take_key()
            elif expect is _Expect.BARE_KEY and character.isspace():
                self._expect = _Expect.COLON
            elif expect is _Expect.BARE_KEY and character in "{}[],<":
                return False
            else:
                self._buffer += character
        elif expect is _Expect.BARE_VALUE:
            if character in ",]}":
                self._end_bare_value()
                return self._arguments_character(character)
            self._buffer += character
        elif character.isspace():
            pass
        elif expect is _Expect.KEY_OR_CLOSE:
            if character == "}":
                self._close()
            elif character in "{}[],:<":
                return False
            else:
                self._buffer = character
                self._expect = _Expect.BARE_KEY
        elif expect is _Expect.COLON:
            if character != ":":
                return False
            self._take_key()
        elif expect in (_Expect.VALUE, _Expect.VALUE_OR_CLOSE):
            if character == "]" and expect is _Expect.VALUE_OR_CLOSE:
                self._close()
            elif character in "{[":
                self._emit_item(character)
                self._stack.append("}" if character == "{" else "]")
                self._expect = _Expect.KEY_OR_CLOSE if character == "{" else _Expect.VALUE_OR_CLOSE
            elif character in ",:]}":
                return False
            else:
                self._buffer = character
                self._expect = _Expect.BARE_VALUE
        elif expect is _Expect.COMMA_OR_CLOSE:
            if character == ",":
                self._comma = True
                in_object = self._stack[-1] == "}"
                self._expect = _Expect.KEY_OR_CLOSE if in_object else _Expect.VALUE_OR_CLOSE
            elif character == self._stack[-1]:
                self._close()
            else:
                return False
        else:
            return False
        return True

    def _take_key(self) -> None:
        self._emit_item(json.dumps(self._buffer, ensure_ascii=False) + ": ")
        self._buffer = ""
        self._expect = _Expect.VALUE

    def _end_bare_value(self) -> None:
        self._emit_item(_bare_value_json(self._buffer.strip()))
        self._buffer = ""
        self._after_value()

    def _after_value(self) -> None:
        self._expect = _Expect.COMMA_OR_CLOSE

    def _close(self) -> None:
        self._comma = False
        self._emit(self._stack.pop())
        self._expect = _Expect.COMMA_OR_CLOSE if self._stack else _Expect.CALL_CLOSE

    def _break_call(self, rest: str) -> None:
        """End a call that broke off: close what is open as valid JSON and read `rest` (and what
        follows) as content."""
        expect = self._expect
        if expect is _Expect.STRING:
            self._emit('"')
        elif expect is _Expect.BARE_VALUE:
            self._emit_item(_bare_value_json(self._buffer.strip()))
        elif expect is _Expect.VALUE:
            self._emit("null")
        self._comma = False
        self._buffer = ""
        self._emit("".join(reversed(self._stack)))
        self._stack = []
        self._mode = _Mode.CONTENT
        self._push_back(rest)


def _bare_value_json(word: str) -> str:
    """The JSON of an unquoted value: a number, true, false, null, or else the word as a
    string."""
    if word in ("true", "false", "null") or _JSON_NUMBER.fullmatch(word):
        return word
    return json.dumps(word, ensure_ascii=False)
