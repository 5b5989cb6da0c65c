"""Fuzz target: the wire protocol's decoders (pygemma4.protocol) and what the server does next.

The first byte picks the decoder: a client's request, a server's reply, or one worker inbox;
the rest is the frame. A decoded message must encode to a frame that decodes to the same
message (frame for frame). A decoded generation request goes on as the tokenizer worker takes
it: its sampling parameters checked, its prompt tokenized (a chat rendered through the Gemma 4
template).
"""

from __future__ import annotations

from harness import demo_tokenizer, main

from pygemma4 import protocol
from pygemma4.protocol import Chat, Completion
from pygemma4.workers.tokenizer import chat_template_input

TOKENIZER = demo_tokenizer()
INBOXES = (
    protocol.FrontEndInbox,
    protocol.TokenizerInbox,
    protocol.DecodeInbox,
)
DECODERS = (
    protocol.decode_request,
    protocol.decode_reply,
    *(protocol.InboxDecoder(f"inbox {i}", inbox).decode for i, inbox in enumerate(INBOXES)),
)


def fuzz_one(data: bytes) -> None:
    """Decode the frame after `data`'s first byte with the decoder that byte picks."""
    if not data:
        return
    decode, frame = DECODERS[data[0] % len(DECODERS)], data[1:]
    protocol.request_id_of(frame)
    message = decode(frame)
    encoded = protocol.encode(message)
    again = protocol.encode(decode(encoded))
    if again != encoded:
        raise AssertionError(f"{message!r} does not survive encoding: {encoded!r}, {again!r}")
    if isinstance(message, (Completion, Chat)):
        tokenize_request(message)


def tokenize_request(request: Completion | Chat) -> None:
    """Check and tokenize a generation request as the tokenizer worker does."""
    protocol.sampling_params(request.sampling)
    if isinstance(request, Chat):
        messages, variables = chat_template_input(request)
        TOKENIZER.encode_chat(messages, **variables)
    elif isinstance(request.prompt, str):
        TOKENIZER.encode(request.prompt)


if __name__ == "__main__":
    main(fuzz_one)
