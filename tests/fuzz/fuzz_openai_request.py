"""Fuzz target: the request bodies of the OpenAI front door (pygemma4.openai_api, workers/http.py)
on their way to the server.

The first byte picks the route (chat or text completions); the rest is the body. A body that
is JSON goes the route's way: parsed into its request model and checked, turned into the
client's call (the pygemma4 client's own checks, with a client that is never connected), and
the frame that call would send is taken as the tokenizer worker takes it (fuzz
target `protocol`). Any error but a Gemma4Error would reach the user as a 500.
"""

from __future__ import annotations

import json

from fuzz_protocol import tokenize_request
from harness import main

from pygemma4 import protocol
from pygemma4.client import AsyncClient
from pygemma4.openai_api import ChatCompletionRequest, CompletionRequest, parse_request
from pygemma4.workers.http import Generation

# Requests are built, never sent: nothing listens here.
CLIENT = AsyncClient("inproc://pygemma4-fuzz-nobody")


def fuzz_one(data: bytes) -> None:
    """Take the body after `data`'s first byte as a chat (even) or completions (odd) request."""
    if not data:
        return
    try:
        body = json.loads(data[1:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return  # the route answers 400 before any parsing of its own
    generations = _chat(body) if data[0] % 2 == 0 else _completions(body)
    for generation in generations:
        frame = generation.open(CLIENT)._call.frame  # what the client would send
        tokenize_request(protocol.decode_request(frame))


def _chat(body: object) -> list[Generation]:
    request = parse_request(ChatCompletionRequest, body)
    request.check_common()
    request.check_tools()
    options = {
        **request.sampling(request.logprobs_wanted()),
        **request.chat_options(),
        "ignore_eos": request.ignore_eos,
        "raw_text": True,
    }
    messages = [m.wire() for m in request.messages]
    return [Generation(True, messages, request.max_new_tokens(), options)]


def _completions(body: object) -> list[Generation]:
    request = parse_request(CompletionRequest, body)
    request.check_common()
    request.check_completion()
    top = request.logprobs if request.logprobs is not None else -1
    options = {**request.sampling(max(1, top) if top >= 0 else 0), "ignore_eos": request.ignore_eos}
    return [Generation(False, prompt, request.max_tokens, options) for prompt in request.prompts()]


if __name__ == "__main__":
    main(fuzz_one)
