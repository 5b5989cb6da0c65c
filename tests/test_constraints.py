"""Constrained decoding: JSON schemas, JSON objects and forced tool calls, through the sampler,
the engine on every reference model and the demo model, and a real server."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from conftest import rewrite_gguf
from serve_helpers import ServeProcess

from pygemma4 import protocol
from pygemma4.chat_output import parse_chat_output
from pygemma4.client import ServerError
from pygemma4.constraints import (
    Constraint,
    ConstraintError,
    check_constraint,
    tool_call_grammar,
)
from pygemma4.engine import Engine
from pygemma4.errors import SamplingParamsError
from pygemma4.generation import TokenChoice
from pygemma4.gguf_file import read_gguf
from pygemma4.sampling import Sampler, SamplingParams
from pygemma4.tokenizer import CONTROL, Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_MODELS = sorted((REPO_ROOT.parent / "shared" / "fixtures").glob("*/model-*.gguf"))

# Bounded everywhere, so that even a model of random weights finishes it in few tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
MAX_TOKENS = 160


def model_ids() -> list[str]:
    return [f"{path.parent.name}/{path.name}" for path in FIXTURE_MODELS]


@pytest.fixture(scope="module", params=[*FIXTURE_MODELS, "demo"], ids=[*model_ids(), "demo"])
def engine(request: pytest.FixtureRequest, demo_model_file: Path) -> Engine:
    path = demo_model_file if request.param == "demo" else request.param
    return Engine(path, threads=1, n_ctx=512)


def generated_text(engine: Engine, params: SamplingParams, prompt: str = "Hello") -> str:
    chunks = list(engine.stream(engine.tokenizer.encode(prompt), MAX_TOKENS, params))
    assert chunks[-1].finish_reason == "stop", "".join(c.text for c in chunks)
    # The grammar ends with an end-of-generation token, which adds no text.
    assert chunks[-1].token_id in engine.tokenizer.end_of_generation_ids
    return "".join(c.text for c in chunks)


# --- the engine on every model ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(engine: Engine, temperature: float) -> None:
    for seed in range(2 if temperature else 1):
        params = SamplingParams(temperature=temperature, seed=seed, json_schema=json.dumps(PERSON))
        text = generated_text(engine, params)
        jsonschema.validate(json.loads(text), PERSON)


def test_the_grammar_ends_generation_even_where_stop_tokens_are_ignored(engine: Engine) -> None:
    params = SamplingParams(temperature=0, json_schema=json.dumps(PERSON))
    prompt = engine.tokenizer.encode("Hello")
    chunks = list(engine.stream(prompt, MAX_TOKENS, params, stop_tokens=()))
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].token_id in engine.tokenizer.end_of_generation_ids
    jsonschema.validate(json.loads("".join(c.text for c in chunks)), PERSON)


def completed_json(prefix: str) -> Any:
    """The value of the first completion of `prefix` (text cut off by max_tokens) that parses
    as JSON, from a set of endings for cut numbers, literals, escapes, strings and keys, then
    the brackets left open; None when none parses."""
    for middle in itertools.product(
        ["", "0", "00", "000", "rue", "ue", "e", "alse", "lse", "se", "ull", "ll", "l"],
        ["", '"'],
        ["", ":0", '"":0', "0"],
    ):
        text = prefix + "".join(middle)
        try:
            return json.loads(text + _closing_brackets(text))
        except json.JSONDecodeError:
            continue
    return None


def _closing_brackets(text: str) -> str:
    """The brackets that close those `text` leaves open (outside strings)."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif in_string:
            escaped = char == "\\"
            in_string = char != '"'
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append("}" if char == "{" else "]")
        elif char in "}]" and stack:
            stack.pop()
    return "".join(reversed(stack))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_object_mode_gives_an_object(engine: Engine, temperature: float) -> None:
    # A random model rarely closes an open object within max_tokens; what it writes must
    # still be the start of one.
    for seed in range(3 if temperature else 1):
        params = SamplingParams(
            temperature=temperature, seed=seed, json_schema='{"type": "object"}'
        )
        chunks = list(engine.stream(engine.tokenizer.encode("Hi"), 60, params))
        text = "".join(c.text for c in chunks)
        if chunks[-1].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert isinstance(completed_json(text), dict), text


def test_the_json_prefix_check_can_fail() -> None:
    assert completed_json('{"a": [1, {"b": "x\\u00') == {"a": [1, {"b": "x\u0000"}]}
    assert completed_json('{"k') == {"k": 0}
    assert completed_json('{"a":tr') == {"a": True}
    assert completed_json('{"a" 1') is None
    assert completed_json("[1,") == [1, 0]
    assert completed_json('["a\\"]') == ['a"]']


def test_a_schema_the_library_rejects_is_a_clear_error(engine: Engine) -> None:
    prompt = engine.tokenizer.encode("Hello")
    for schema in ('{"type": "nonsense"}', '{"$ref": "#/nowhere"}'):
        with pytest.raises(ConstraintError, match="json_schema is not usable: "):
            check_constraint(SamplingParams(json_schema=schema))
    check_constraint(SamplingParams(json_schema=json.dumps(PERSON)))
    check_constraint(SamplingParams(grammar=tool_call_grammar(TOOLS)))
    with pytest.raises(ConstraintError, match="json_schema is not usable: .*nonsense"):
        engine.stream(prompt, 8, SamplingParams(json_schema='{"type": "nonsense"}'))
    with pytest.raises(ConstraintError, match="grammar is not usable"):
        engine.stream(prompt, 8, SamplingParams(grammar="start: <|no_such_token|>"))


ENDLESS_KEY = "k" * 3000


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(grammar='start: "a" start'), "Too many items"),
        (SamplingParams(grammar='start: "n' + "F" * 100 + '" start'), "forces more than 65536"),
        (
            SamplingParams(
                json_schema=json.dumps(
                    {
                        "type": "object",
                        "properties": {ENDLESS_KEY: {"$ref": "#"}},
                        "required": [ENDLESS_KEY],
                        "additionalProperties": False,
                    }
                )
            ),
            "forces more than 65536",
        ),
    ],
    ids=["short-string", "long-string", "self-requiring-schema"],
)
def test_a_constraint_that_forces_endless_text_fails(
    tool_tokenizer: Tokenizer, params: SamplingParams, message: str
) -> None:
    """A grammar with no end forces text without end; the constraint must refuse it rather
    than compute and tokenize megabytes of it (seconds of CPU for each token's mask)."""
    constraint = Constraint(params, tool_tokenizer)
    with pytest.raises(ConstraintError, match=message):
        for _ in range(4):
            allowed = constraint.allowed(tool_tokenizer.vocab_size).nonzero()[0]
            constraint.accept(int(allowed[0]))


# --- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"json_schema": "[1]"}, "json_schema must be None or a JSON schema's text"),
        ({"json_schema": {"type": "object"}}, "json_schema must be None or"),
        ({"grammar": ""}, "grammar must be None or a non-empty Lark grammar"),
        ({"grammar": 3}, "grammar must be None or"),
        ({"json_schema": "{}", "grammar": "start: /a/"}, "cannot both be given"),
    ],
)
def test_bad_constraint_parameters_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**values)


def test_constraints_travel_on_the_wire() -> None:
    params = SamplingParams(temperature=0, json_schema='{"type": "object"}')
    wire = protocol.encode(protocol.wire_sampling(params))
    decoded = protocol.msgspec.msgpack.decode(wire, type=protocol.Sampling)
    assert protocol.sampling_params(decoded) == params
    assert params.constrained and not SamplingParams().constrained
    assert Sampler(params).needs_logits  # a constrained sequence is never chosen on the device


def test_a_constraint_needs_the_tokenizer() -> None:
    with pytest.raises(ValueError, match="constrained decoding needs the model's tokenizer"):
        TokenChoice([1], 4, SamplingParams(json_schema="{}"), [1])


# --- the mask in the sampler ---------------------------------------------------------------------


def test_the_mask_applies_before_sampling_and_logprobs_stay_raw() -> None:
    rng = np.random.default_rng(0)
    allowed = np.zeros(50, dtype=np.bool_)
    allowed[[3, 17, 40]] = True
    for params in [
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(temperature=1.5, top_k=10, top_p=0.9, min_p=0.05, seed=1, logprobs=2),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=1, seed=2),
    ]:
        sampler = Sampler(params, [3, 17])
        for _ in range(40):
            logits = rng.normal(size=50).astype(np.float32) * 4
            kept = logits.copy()
            sampled = sampler.sample(logits, allowed)
            assert allowed[sampled.token_id]
            np.testing.assert_array_equal(logits, kept)  # the caller's row is left as is
            log_total = np.log(np.exp(logits.astype(np.float64)).sum())
            assert sampled.logprob == pytest.approx(float(logits[sampled.token_id]) - log_total)
    greedy = Sampler(SamplingParams(temperature=0))
    logits = rng.normal(size=50).astype(np.float32)
    best = max(np.flatnonzero(allowed), key=lambda i: logits[i])
    assert greedy.sample(logits, allowed).token_id == best
    with pytest.raises(ValueError, match="no token the constraint allows has a finite logit"):
        masked = logits.copy()
        masked[allowed] = -np.inf
        greedy.sample(masked, allowed)
    with pytest.raises(ValueError, match="allowed must be a boolean array of shape"):
        greedy.sample(logits, allowed[:10])


# --- forced tool calls -------------------------------------------------------------------------

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "days": {"type": "integer"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "hourly": {"type": "boolean"},
        "stations": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "codes": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 2},
            "minItems": 1,
            "maxItems": 2,
            "description": "annotations are allowed",
        },
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "note": {"type": "null"}},
            "required": ["lat", "note"],
        },
    },
    "required": ["city", "days", "unit", "hourly", "stations", "codes", "where"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping"}},
    {
        "type": "function",
        "function": {
            "name": "tag",
            "parameters": {
                "type": "object",
                "properties": {
                    "labels": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 3}
                },
                "required": ["labels"],
            },
        },
    },
]
TOOL_TOKENS = ("<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>")


@pytest.fixture(scope="module")
def tool_tokenizer() -> Tokenizer:
    """A reference model's vocabulary with Gemma 4's tool-call tokens added (the reference
    vocabularies lack them): the constraint runs on random logits over it."""
    metadata = dict(read_gguf(FIXTURE_MODELS[0]).metadata)
    metadata["tokenizer.ggml.tokens"] = [*metadata["tokenizer.ggml.tokens"], *TOOL_TOKENS]
    types = metadata["tokenizer.ggml.token_type"]
    metadata["tokenizer.ggml.token_type"] = [*types, *[CONTROL] * len(TOOL_TOKENS)]
    return Tokenizer.from_metadata(metadata)


def forced_call(tokenizer: Tokenizer, name: str | None, seed: int) -> tuple[str, str]:
    """The text of a call forced by `tool_call_grammar` on random logits, and why it ended."""
    params = SamplingParams(temperature=1.0, seed=seed, grammar=tool_call_grammar(TOOLS, name))
    choice = TokenChoice(
        [tokenizer.bos_id], 400, params, tokenizer.end_of_generation_ids, tokenizer
    )
    rng = np.random.default_rng(seed)
    while True:
        logits = rng.normal(size=tokenizer.vocab_size).astype(np.float32) * 3
        _, reason = choice.step(logits)
        if reason is not None:
            return tokenizer.decode(choice.token_ids[:-1]), reason


@pytest.mark.parametrize("name", [None, "get_weather", "ping", "tag"])
def test_forced_tool_calls_parse_and_validate(tool_tokenizer: Tokenizer, name: str | None) -> None:
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}
    names = set()
    for seed in range(12):
        text, reason = forced_call(tool_tokenizer, name, seed)
        assert reason == "stop", text
        output = parse_chat_output(text)
        assert (output.content, output.reasoning) == ("", None), text
        (call,) = output.tool_calls
        assert name is None or call.name == name
        arguments = json.loads(call.arguments_json)
        jsonschema.validate(arguments, schemas[call.name] or {"type": "object"})
        names.add(call.name)
    assert name is not None or len(names) > 1  # "required": any of the tools


def test_a_tool_grammar_refuses_what_it_cannot_enforce() -> None:
    def tool(parameters: Any) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]

    def prop(schema: Any) -> list[dict[str, Any]]:
        return tool({"type": "object", "properties": {"a": schema}, "required": ["a"]})

    cases = [
        (tool({"type": "object", "properties": {"a": {"anyOf": []}}, "required": ["a"]}), "anyOf"),
        (tool({"type": "object", "properties": {}, "required": ["b"]}), "names 'b'"),
        (tool({"type": "object", "properties": {"a-b": {}}, "required": ["a-b"]}), "identifier"),
        (
            tool({"type": "object", "properties": {"a": {"type": "date"}}, "required": ["a"]}),
            "date",
        ),
        (prop({"type": "integer", "minimum": 0}), "uses minimum, which a forced tool call cannot"),
        (prop({"type": "string", "format": "date", "pattern": "x"}), "uses format, pattern"),
        (prop({"type": "string", "minLength": 3, "maxLength": 2}), "0 <= min <= max"),
        (prop({"type": "array", "minItems": 2, "maxItems": 0}), "0 <= min <= max"),
        (prop({"description": "anything"}), "has type None"),
        ([{"type": "function"}], "not a function tool"),
        ([], "at least one tool"),
    ]
    for tools, message in cases:
        with pytest.raises(ConstraintError, match=message):
            tool_call_grammar(tools)
    with pytest.raises(ConstraintError, match="'g', which is not among the tools"):
        tool_call_grammar(TOOLS, "g")


def with_tool_tokens(source: Path, target: Path) -> Path:
    """A copy of the model `source` whose vocabulary has Gemma 4's tool-call tokens in place
    of four byte tokens that UTF-8 text never uses (0xF8-0xFB), so that they lie within the
    model's logits."""
    metadata = read_gguf(source).metadata
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata["tokenizer.ggml.token_type"])
    for token in TOOL_TOKENS:
        i = tokens.index(f"<0x{0xF8 + TOOL_TOKENS.index(token):02X}>")
        tokens[i], types[i] = token, CONTROL
    overrides = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    return rewrite_gguf(source, target, overrides)


@pytest.mark.parametrize("source", [*FIXTURE_MODELS, "demo"], ids=[*model_ids(), "demo"])
def test_a_model_forced_to_call_a_tool_calls_it(
    source: Path | str, demo_model_file: Path, tmp_path: Path
) -> None:
    path = with_tool_tokens(
        demo_model_file if source == "demo" else Path(source), tmp_path / "m.gguf"
    )
    engine = Engine(path, threads=1, n_ctx=512)
    prompt = engine.tokenizer.encode("What is the weather?")
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}
    for name, temperature, seed in [
        (None, 0.0, 0),
        ("get_weather", 0.0, 0),
        (None, 1.0, 1),
        ("tag", 1.0, 2),
    ]:
        params = SamplingParams(
            temperature=temperature, seed=seed, grammar=tool_call_grammar(TOOLS, name)
        )
        chunks = list(engine.stream(prompt, MAX_TOKENS, params))
        assert chunks[-1].finish_reason == "stop"
        text = engine.tokenizer.decode([c.token_id for c in chunks[:-1]])
        (call,) = parse_chat_output(text).tool_calls
        assert name is None or call.name == name
        jsonschema.validate(json.loads(call.arguments_json), schemas[call.name] or {})


def test_a_vocabulary_without_tool_tokens_cannot_force_a_call(engine: Engine) -> None:
    # What the reference and demo vocabularies lack is said, not worked around.
    params = SamplingParams(grammar=tool_call_grammar(TOOLS, "ping"))
    with pytest.raises(ConstraintError, match="unknown special token"):
        Constraint(params, engine.tokenizer)


# --- a real server gives the engine's tokens ------------------------------------------------


@pytest.fixture(scope="module")
def server(
    demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    workdir = tmp_path_factory.mktemp("constrained")
    with ServeProcess.running(demo_model_file, workdir, "--threads", "1", "--n-ctx", "512") as s:
        yield s


def test_the_server_constrains_as_the_engine_does(
    server: ServeProcess, demo_model_file: Path
) -> None:
    engine = Engine(demo_model_file, threads=1, n_ctx=512)
    schema = json.dumps(PERSON)
    prompt = "Tell me about someone."
    expected = engine.generate(
        engine.tokenizer.encode(prompt),
        MAX_TOKENS,
        SamplingParams(temperature=0, json_schema=schema),
    )
    with server.client() as client:
        result = client.complete(prompt, MAX_TOKENS, temperature=0, json_schema=schema)
        assert list(result.token_ids) == expected
        assert result.finish_reason == "stop"
        jsonschema.validate(json.loads(result.text), PERSON)
        with pytest.raises(ServerError, match="bad_request: json_schema is not usable"):
            client.complete(prompt, 4, json_schema='{"type": "nonsense"}')
        assert client.complete(prompt, 4, temperature=0).completion_tokens == 4  # still serving
