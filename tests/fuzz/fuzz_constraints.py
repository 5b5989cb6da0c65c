"""Fuzz target: constrained decoding (pygemma4.constraints) from what requests can carry.

The first byte picks the source: a response_format JSON schema's text, OpenAI tools (JSON) for a
forced tool call (the grammar `tool_call_grammar` writes, of any tool or of the first), or a
Lark grammar as the protocol's `grammar` field takes it; the rest is that text. A constraint
that is accepted is compiled over the demo vocabulary and walked a few tokens, always taking
the lowest allowed id.
"""

from __future__ import annotations

import json

from harness import demo_tokenizer, main, text_of

from pygemma4.constraints import Constraint, check_constraint, tool_call_grammar
from pygemma4.sampling import SamplingParams

TOKENIZER = demo_tokenizer()
STEPS = 8


def fuzz_one(data: bytes) -> None:
    """Build, check, compile and walk the constraint `data` describes."""
    if not data:
        return
    kind, text = data[0] % 4, text_of(data[1:])
    if kind == 0:
        params = SamplingParams(json_schema=text)
    elif kind == 3:
        params = SamplingParams(grammar=text)
    else:
        try:
            tools = json.loads(text)
        except (ValueError, RecursionError):
            return
        if not isinstance(tools, list):
            return
        first = _first_tool_name(tools) if kind == 2 else None
        params = SamplingParams(grammar=tool_call_grammar(tools, first))
    check_constraint(params)
    constraint = Constraint(params, TOKENIZER)
    for _ in range(STEPS):
        if constraint.finished:
            break
        allowed = constraint.allowed(TOKENIZER.vocab_size).nonzero()[0]
        if not len(allowed):
            break
        constraint.accept(int(allowed[0]))


def _first_tool_name(tools: list[object]) -> str | None:
    tool = tools[0] if tools else None
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


if __name__ == "__main__":
    main(fuzz_one)
