"""Fuzz target: the parsers of chat output (pygemma4.chat_output): reasoning channels and tool
calls in Gemma 4's syntax.

The first byte sets whether the output starts inside reasoning and where the text is cut for
streaming; the rest is the model's text. The streamed deltas must add up to what parsing the
whole text gives.
"""

from __future__ import annotations

from harness import main, text_of

from pygemma4.chat_output import ChatOutputStream, assemble, parse_chat_output


def _call_ids() -> object:
    counter = iter(range(1 << 62))
    return lambda: f"call_{next(counter)}"


def fuzz_one(data: bytes) -> None:
    """Parse the text after `data`'s first byte whole and in pieces, and compare."""
    if not data:
        return
    flags, text = data[0], text_of(data[1:])
    in_reasoning = bool(flags & 1)
    step = 1 + (flags >> 1)
    whole = parse_chat_output(text, in_reasoning=in_reasoning, call_id=_call_ids())
    stream = ChatOutputStream(in_reasoning, call_id=_call_ids())
    deltas = [stream.feed(text[i : i + step]) for i in range(0, len(text), step)]
    streamed = assemble([*deltas, stream.finish()])
    if streamed != whole:
        raise AssertionError(f"streamed in pieces of {step}: {streamed!r}, whole: {whole!r}")


if __name__ == "__main__":
    main(fuzz_one)
