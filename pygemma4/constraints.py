"""Constrained decoding: the tokens a JSON schema or a grammar allows next, with llguidance.

llguidance (the grammar engine of Guidance, also used by llama.cpp and vLLM) is chosen for
computing a whole vocabulary's mask in tens of microseconds without a precomputation per
grammar, which suits schemas that change with every request, and for its Lark grammars that
name special tokens by their text (`<|tool_call>`, `<|"|>`), which Gemma 4's tool-call syntax
needs. Its vocabulary is built from the GGUF's own tokens (`Tokenizer`), once per tokenizer.

A `Constraint` follows one sequence: `allowed` is the mask of the next token, `accept`
advances it by the token chosen, and `finished` says when nothing but the end can follow.
`tool_call_grammar` writes the grammar that forces a call of a tool in Gemma 4's syntax.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import numpy as np

from pygemma4.errors import SamplingParamsError
from pygemma4.sampling import SamplingParams
from pygemma4.tokenizer import CONTROL, UNKNOWN, USER_DEFINED, Tokenizer

__all__ = [
    "Constraint",
    "ConstraintError",
    "check_constraint",
    "grammar_vocabulary",
    "tool_call_grammar",
]

# The JSON the output must be: compact (whitespace between tokens would only give a model
# room to wander).
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
# A grammar that forces an endless string (`start: "ab" start`, or a schema requiring itself
# under a long key) makes llguidance compute forced text until its cap on Earley items per
# step, then tokenize all of it: megabytes, seconds of CPU per mask at its default cap
# (50,000). At 10,000 items, and with forced text past _MAX_FORCED_CHARS refused untokenized,
# such a grammar fails with a ConstraintError in a tenth of a second where its repeated string
# is 100 characters long (0.4 s at 2,000; the cost still grows with that length), while every
# schema and tool-call grammar stays far below both caps.
_LIMITS = llguidance.LLParserLimits(step_max_items=10_000)
_MAX_FORCED_CHARS = 65_536
_FORCED_TOO_LONG = f"the constraint forces more than {_MAX_FORCED_CHARS} characters"

_vocabularies: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = (
    weakref.WeakKeyDictionary()
)


class ConstraintError(SamplingParamsError):
    """A JSON schema or grammar that constrained decoding cannot follow, or a token it does
    not allow."""


class _TokenizerView:
    """What `llguidance.TokenizerWrapper` reads of a tokenizer: the bytes of every token,
    which ones are special, and how text is tokenized."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        special = (UNKNOWN, CONTROL, USER_DEFINED)
        self.special_token_ids = [
            i for i, kind in enumerate(tokenizer.token_types) if kind in special
        ]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        # llguidance calls this for text the grammar forces; raising puts its matcher into
        # its error state with this message.
        if len(text) > _MAX_FORCED_CHARS:
            raise ValueError(_FORCED_TOO_LONG)
        return self._tokenizer.encode(text, add_bos=False, parse_special=False)


def grammar_vocabulary(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer`'s vocabulary, built once per tokenizer; its
    end-of-generation tokens end a grammar."""
    vocabulary = _vocabularies.get(tokenizer)
    if vocabulary is None:
        vocabulary = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_TokenizerView(tokenizer)),
            eos_token=sorted(tokenizer.end_of_generation_ids),
        )
        _vocabularies[tokenizer] = vocabulary
    return vocabulary


def _grammar_text(params: SamplingParams) -> str:
    """llguidance's grammar for `params`' schema or Lark grammar."""
    if params.json_schema is not None:
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                params.json_schema, defaults=_JSON_OPTIONS
            )
        except ValueError as e:
            raise ConstraintError(f"json_schema is not usable: {e}") from None
    if params.grammar is not None:
        return llguidance.LLMatcher.grammar_from_lark(params.grammar)
    raise ValueError("these sampling parameters constrain nothing")


def _what(params: SamplingParams) -> str:
    return "json_schema" if params.json_schema is not None else "grammar"


def check_constraint(params: SamplingParams) -> None:
    """ConstraintError naming what llguidance rejects in `params`' schema or grammar, checked
    without a vocabulary (special tokens are only resolved against one, by `Constraint`)."""
    if params.constrained:
        error = llguidance.LLMatcher.validate_grammar(_grammar_text(params), limits=_LIMITS)
        if error:
            raise ConstraintError(f"{_what(params)} is not usable: {error}")


class Constraint:
    """The grammar state of one constrained sequence."""

    def __init__(self, params: SamplingParams, tokenizer: Tokenizer) -> None:
        """The constraint of `params` (its json_schema or grammar) over `tokenizer`'s
        vocabulary; ConstraintError naming the problem where llguidance rejects it."""
        vocabulary = grammar_vocabulary(tokenizer)
        self._matcher = llguidance.LLMatcher(
            vocabulary, _grammar_text(params), log_level=0, limits=_LIMITS
        )
        self._check(f"{_what(params)} is not usable")
        self._eos = frozenset(vocabulary.eos_tokens)
        self._n_vocab = vocabulary.vocab_size

    @property
    def finished(self) -> bool:
        """Whether the grammar has ended: nothing but an end-of-generation token may follow,
        or one already has."""
        return self._matcher.is_stopped()

    def allowed(self, width: int) -> np.ndarray:
        """The tokens the grammar allows next, as a boolean array of `width` (the logits'
        length; ids past the vocabulary are never allowed)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        self._check("the constraint failed")
        mask = np.zeros(width, dtype=np.bool_)
        n = min(width, self._n_vocab)
        mask[:n] = np.unpackbits(bits, bitorder="little")[:n]
        return mask

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; whether it ended the grammar with an end-of-generation
        token (ConstraintError where the grammar does not allow it)."""
        self._matcher.consume_token(token_id)
        self._check(f"token {token_id} is not allowed by the constraint")
        return token_id in self._eos and self._matcher.is_stopped()

    def _check(self, what: str) -> None:
        if self._matcher.is_error():
            error = self._matcher.get_error()
            # The tokenizer's refusal comes wrapped in llguidance's panic report.
            if _FORCED_TOO_LONG in error:
                error = _FORCED_TOO_LONG
            raise ConstraintError(f"{what}: {error}")


# --- Forced tool calls in Gemma 4's syntax ----------------------------------------------------

# A string value is raw text between `<|"|>` tokens; it may not spell `<|` with text tokens,
# so that the text read back cannot hold a string delimiter.
_STRING_BODY = r"/([^<]|<[^<|])*/"
_INTEGER = r"/-?(0|[1-9][0-9]{0,15})/"
_NUMBER = r"/-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,16})?([eE][-+]?[0-9]{1,2})?/"
# The keywords of a tool's parameter schema that the grammar enforces (or that say nothing
# about the value); any other is refused, so that a call is never claimed to follow a schema
# it may break.
_ANNOTATIONS = {"description", "title", "default", "examples", "$schema", "$comment"}
_ENFORCED: dict[object, set[str]] = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "array": {"type", "items", "minItems", "maxItems"},
    "string": {"type", "minLength", "maxLength"},
    "integer": {"type"},
    "number": {"type"},
    "boolean": {"type"},
    "null": {"type"},
}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> str:
    """A Lark grammar for exactly one call, in Gemma 4's syntax
    (`<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>`), of the tool `name`, or of
    any of `tools` where `name` is None; `tools` are OpenAI tool definitions. The arguments
    follow each tool's JSON-schema parameters: every property in `required`, in the schema's
    order (optional properties are left out), strings within their `enum`, `minLength` and
    `maxLength`, arrays within `minItems`/`maxItems`. ConstraintError names a schema it cannot
    enforce (any other keyword but annotations such as `description`)."""
    functions: dict[str, Mapping[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ConstraintError(f"tools[{i}] is not a function tool with a name")
        functions[function["name"]] = function
    if name is not None:
        if name not in functions:
            raise ConstraintError(f"tool_choice names {name!r}, which is not among the tools")
        functions = {name: functions[name]}
    if not functions:
        raise ConstraintError("a forced tool call needs at least one tool")
    rules = _Rules()
    calls = []
    for function_name, function in functions.items():
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        arguments = rules.value(parameters, f"{function_name}.parameters")
        calls.append(f"<|tool_call> {_literal('call:' + function_name)} {arguments} <tool_call|>")
    return "start: " + " | ".join(f"({call})" for call in calls) + "\n" + rules.text()


def _count(value: object) -> bool:
    """Whether `value` is an integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _literal(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


class _Rules:
    """The rules of a tool-call grammar, one per schema value."""

    def __init__(self) -> None:
        self._rules: list[str] = []

    def text(self) -> str:
        return "\n".join(self._rules) + "\n"

    def _rule(self, body: str) -> str:
        name = f"v{len(self._rules)}"
        self._rules.append(f"{name}: {body}")
        return name

    def value(self, schema: object, where: str) -> str:
        """The rule for a value following `schema` (at `where`, for errors)."""
        if not isinstance(schema, Mapping):
            raise ConstraintError(f"{where} must be a JSON schema object")
        kind = schema.get("type")
        if kind is not None and not isinstance(kind, str):
            raise ConstraintError(f"{where}.type must be one type's name, got {kind!r}")
        enforced = {"enum", "type"} if "enum" in schema else _ENFORCED.get(kind, {"type"})
        unsupported = sorted(set(schema) - enforced - _ANNOTATIONS)
        if unsupported:
            raise ConstraintError(
                f"{where} uses {', '.join(unsupported)}, which a forced tool call cannot enforce"
            )
        if "enum" in schema:
            return self._enum(schema["enum"], where)
        if kind == "object":
            return self._object(schema, where)
        if kind == "array":
            return self._array(schema, where)
        if kind == "string":
            low, high = schema.get("minLength", 0), schema.get("maxLength")
            if (
                not _count(low)
                or not (high is None or _count(high))
                or (high is not None and high < low)
            ):
                raise ConstraintError(
                    f"{where}: minLength and maxLength must be integers, 0 <= min <= max"
                )
            if (low, high) == (0, None):
                return self._rule(f'<|"|> {_STRING_BODY} <|"|>')
            return self._rule(f'<|"|> /[^<]{{{low},{"" if high is None else high}}}/ <|"|>')
        if kind == "integer":
            return self._rule(_INTEGER)
        if kind == "number":
            return self._rule(_NUMBER)
        if kind == "boolean":
            return self._rule('"true" | "false"')
        if kind == "null":
            return self._rule('"null"')
        raise ConstraintError(
            f"{where} has type {kind!r}; forced tool calls support object, array, string, "
            "integer, number, boolean and null"
        )

    def _enum(self, values: object, where: str) -> str:
        if not isinstance(values, list) or not values:
            raise ConstraintError(f"{where}.enum must be a non-empty list")
        options = []
        for value in values:
            if isinstance(value, str):
                if "<|" in value:
                    raise ConstraintError(f"{where}.enum holds a string with '<|'")
                options.append(f'<|"|> {_literal(value)} <|"|>' if value else '<|"|> <|"|>')
            elif value is None or isinstance(value, (bool, int, float)):
                options.append(_literal(json.dumps(value)))
            else:
                raise ConstraintError(f"{where}.enum may hold only strings, numbers, booleans")
        return self._rule(" | ".join(f"({option})" for option in options))

    def _object(self, schema: Mapping[str, Any], where: str) -> str:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise ConstraintError(f"{where}: properties must be an object, required a list")
        missing = [key for key in required if key not in properties]
        if missing:
            raise ConstraintError(f"{where}.required names {missing[0]!r}, not a property")
        items = []
        for key, property_schema in properties.items():
            if key not in required:
                continue
            if not _KEY.match(key):
                raise ConstraintError(f"{where}: the property name {key!r} is not an identifier")
            value = self.value(property_schema, f"{where}.properties.{key}")
            items.append(f"{_literal(key + ':')} {value}")
        return self._rule(" ".join(['"{"', ' "," '.join(items), '"}"']))

    def _array(self, schema: Mapping[str, Any], where: str) -> str:
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if (
            not _count(low)
            or not (high is None or _count(high))
            or (high is not None and high < low)
        ):
            raise ConstraintError(
                f"{where}: minItems and maxItems must be integers, 0 <= min <= max"
            )
        item = self.value(schema.get("items", {"type": "string"}), f"{where}.items")
        rest = f'("," {item})'
        if high == 0:
            return self._rule('"[" "]"')
        more = f"{rest}*" if high is None else f"{rest}{{{max(low - 1, 0)},{high - 1}}}"
        if low == 0:
            return self._rule(f'"[" ({item} {more})? "]"')
        if high is None and low > 1:
            more = f"{rest}{{{low - 1},}}"
        return self._rule(f'"[" {item} {more} "]"')
