"""The server's wire protocol: every message between clients, the front end and the workers.

All messages are msgspec structs encoded as MessagePack, one struct per ZeroMQ frame, tagged
by a `type` field. Decoding is strict: an unknown `type`, an unknown field, a missing field or
a value of the wrong type is an error that names the field, never a guess.

Clients (a ZeroMQ DEALER connected to the server's ROUTER endpoint)
    send one of `ClientRequest`:
      `Completion` (prompt text or token ids), `Chat` (messages through the model's chat
      template), `Cancel` (a request in flight), `Health`, `Info`;
    and receive `ServerReply` messages carrying the `id` the client chose for the request:
      zero or more `Chunk`s (streaming requests only: the tokens and text of one step), then
      exactly one ending: `Done` (finish reason, usage; for a request that did not stream
      also its whole text and tokens), `Cancelled` or `Error` (`code` + `message`);
      `HealthStatus` / `ServerInfo` answer `Health` / `Info`.
    A request's `id` is any integer in [0, 2**63) unique among that client's requests in
    flight. Every client message carries `v`, the protocol version it speaks; a server
    refuses versions it does not speak. An `Error` whose `id` is null answers a message too
    malformed to have a readable id.

Workers (PUSH sockets into each process's one PULL inbox, over `ipc://` on one host)
    exchange the `Internal` messages below; they carry token ids (and a chat's images and
    clips, preprocessed, in frames of their own: `encode_frames`), never KV: the KV cache
    lives in a pool that the decode worker maps (shared memory, or CUDA IPC memory; the
    `KvPoolSpec` describes it). Each process's inbox takes only the messages of its union
    (`FrontEndInbox`, `TokenizerInbox`, `DecodeInbox`); another message reaching it is a
    `MisroutedMessageError`.

Request flow: client → front end (`AdmittedRequest`) → tokenizer worker (`TokenizedRequest`) →
decode worker, which prefills prompts in chunks and decodes every running sequence, together
in each step (`StepTokens`) → tokenizer worker (detokenize, stop strings; `EncodedReply`) →
front end → client. The decode worker also tells the front end how much of the KV pool its
sequences hold and what drafting kept (`DecodeLoad`), which health and info report.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Literal

import msgspec

from pygemma4.errors import Gemma4Error, SamplingParamsError
from pygemma4.sampling import MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams

PROTOCOL_VERSION = 1
"""Bumped whenever a message changes incompatibly."""

RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
FinishReason = Literal["stop", "length"]


class ProtocolError(Gemma4Error, ValueError):
    """A message is not a valid message of this protocol."""


def _sampling_struct() -> type[msgspec.Struct]:
    """A struct with exactly `SamplingParams`' fields, types and defaults: the wire form of
    sampling parameters, so that they are defined once."""
    hints = typing.get_type_hints(SamplingParams)
    return msgspec.defstruct(
        "Sampling",
        [(f.name, hints[f.name], f.default) for f in dataclasses.fields(SamplingParams)],
        kw_only=True,
        forbid_unknown_fields=True,
        omit_defaults=True,
        module=__name__,
    )


Sampling = _sampling_struct()
"""Sampling parameters on the wire; `sampling_params` checks their ranges."""


def sampling_params(sampling: msgspec.Struct) -> SamplingParams:
    """The checked `SamplingParams` of a wire `Sampling` (SamplingParamsError when out of
    range)."""
    return SamplingParams(**msgspec.structs.asdict(sampling))


def wire_sampling(params: SamplingParams) -> msgspec.Struct:
    """The wire form of `params`."""
    return Sampling(**{f.name: getattr(params, f.name) for f in dataclasses.fields(params)})


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Base of every message: unknown fields are refused."""


# --- Client → server -------------------------------------------------------------------------


class _ClientMessage(_Strict, tag_field="type"):
    id: RequestId
    v: int = PROTOCOL_VERSION


class TextPart(_Strict, tag="text", tag_field="type"):
    """A piece of a message's text (OpenAI's `{"type": "text", "text": ...}` content part)."""

    text: str


class ImageUrl(_Strict):
    """Where an image part's image is: a `data:image/<png|jpeg|webp>;base64,...` URI (a
    server fetches nothing and reads no file, so other URLs are refused)."""

    url: str
    detail: str | None = None
    """OpenAI's "low" (the smallest image budget, 70 soft tokens), "high" (the server's most)
    or "auto" (the request's `max_image_tokens`)."""


class ImageUrlPart(_Strict, tag="image_url", tag_field="type"):
    """An image in a message (OpenAI's `{"type": "image_url", "image_url": {"url": ...}}`),
    for a server started with a projector that has a vision tower."""

    image_url: ImageUrl


class InputAudio(_Strict):
    """A clip: a WAV file's bytes in base64 (`format` "wav", the one read)."""

    data: str
    format: str = "wav"


class InputAudioPart(_Strict, tag="input_audio", tag_field="type"):
    """A clip in a message (OpenAI's `{"type": "input_audio", "input_audio": {"data": ...,
    "format": "wav"}}`), for a server started with a projector that has an audio tower."""

    input_audio: InputAudio


ContentPart = TextPart | ImageUrlPart | InputAudioPart
"""A part of a message's content: text, an image or a clip."""


TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
ToolName = Annotated[str, msgspec.Meta(pattern=TOOL_NAME_PATTERN)]
"""A function's name: what the model can write after `call:`."""


class FunctionCall(_Strict):
    """A function the assistant called: its arguments as a JSON object's text (OpenAI's
    shape) or as the object."""

    name: ToolName
    arguments: str | dict[str, typing.Any]


class ToolCall(_Strict):
    """One tool call of an assistant message, in OpenAI's shape."""

    function: FunctionCall
    id: str | None = None
    type: Literal["function"] = "function"


class ChatMessage(_Strict):
    """One turn of a conversation, in OpenAI's shape: role "system", "developer" (taken as
    "system"), "user", "assistant" or "tool"; `content` may be None only for an assistant
    message with `tool_calls`; a "tool" message answers the call `tool_call_id`."""

    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None
    """The assistant's reasoning, which templates may show again after the last user turn."""


class FunctionDefinition(_Strict):
    """A function the model may call; `parameters` is a JSON schema of its arguments."""

    name: ToolName
    description: str | None = None
    parameters: dict[str, typing.Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Strict):
    """A tool the model may call, in OpenAI's shape."""

    function: FunctionDefinition
    type: Literal["function"] = "function"


class _Generation(_ClientMessage):
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Most tokens to generate; None: up to the end of the context."""
    sampling: Sampling = msgspec.field(default_factory=Sampling)  # type: ignore[valid-type]
    stream: bool = False
    """Send a `Chunk` per step, not only the final `Done`."""
    ignore_eos: bool = False
    """Keep going past the model's end-of-generation tokens."""
    raw_text: bool = False
    """The replies' text keeps the special tokens' texts (`<|channel>`, `<|tool_call>`, ...),
    for parsing with `pygemma4.chat_output`."""
    speculative: bool = True
    """Decode with the server's drafter, where it has one (False: one token per step)."""


class Completion(_Generation, tag="completion", kw_only=True):
    """Continue a prompt: text (tokenized with a leading BOS) or token ids as they are."""

    prompt: str | list[TokenId]


class Chat(_Generation, tag="chat", kw_only=True):
    """Answer a conversation rendered through the model's chat template."""

    messages: list[ChatMessage]
    tools: list[ToolDefinition] | None = None
    """Tools the chat template declares to the model."""
    chat_template_kwargs: dict[str, typing.Any] | None = None
    """Extra variables for the chat template, e.g. `{"enable_thinking": True}`."""
    max_image_tokens: int | None = None
    """Soft tokens each image gets at most (70, 140, 280, 560, 1120), unless its part's
    `detail` says otherwise; None: the server's `max_image_tokens`, also the most allowed."""


class Cancel(_ClientMessage, tag="cancel"):
    """Stop the request `id` of the same client; it ends with `Cancelled`."""


class Health(_ClientMessage, tag="health"):
    """Ask whether the server's processes are up."""


class Info(_ClientMessage, tag="info"):
    """Ask for the model and the server's limits."""


ClientRequest = Completion | Chat | Cancel | Health | Info
GenerationRequest = Completion | Chat


# --- Server → client -------------------------------------------------------------------------


class _Reply(_Strict, tag_field="type"):
    id: RequestId | None


class TokenLogprobs(_Strict):
    """A generated token's log-probability and the most likely alternatives."""

    logprob: float
    top: list[tuple[TokenId, float]] = []


class Chunk(_Reply, tag="chunk"):
    """What one step added to a streaming request (text is never split inside a character;
    it may be empty while a stop string is still possible)."""

    token_ids: list[TokenId]
    text: str
    logprobs: list[TokenLogprobs] | None = None
    in_reasoning: bool = False
    """A chat whose prompt ends inside an open thought channel: the output starts as
    reasoning."""


class Done(_Reply, tag="done"):
    """A request finished. For a streaming request the tokens and text came in the chunks and
    these fields are empty."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[TokenId] = []
    text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    in_reasoning: bool = False
    """As `Chunk.in_reasoning`."""
    cached_tokens: int = 0
    """Prompt tokens whose KV the server had cached (not computed again)."""


class Cancelled(_Reply, tag="cancelled"):
    """A request ended because the client cancelled it."""


ErrorCode = Literal[
    "bad_request",  # malformed message or invalid parameters
    "too_large",  # message over the size limit
    "context_length",  # prompt (plus max_tokens) does not fit the context or the KV pool
    "busy",  # the queue of requests is full; retry later
    "version",  # a protocol version the server does not speak
    "worker_failed",  # a worker holding the request died
    "internal",  # anything else gone wrong on the server
]


class Error(_Reply, tag="error"):
    """A request failed; `message` says why in words a user can act on."""

    code: ErrorCode
    message: str


class WorkerState(_Strict):
    """One server process as the supervisor sees it."""

    name: str
    pid: int
    alive: bool
    restarts: int


class SpeculationCounts(_Strict):
    """Draft tokens proposed and accepted since the decode worker started, in all and per
    draft position, over `steps` verification steps that carried drafts."""

    steps: int
    proposed: int
    accepted: int
    proposed_at: list[int]
    accepted_at: list[int]


class HealthStatus(_Reply, tag="health"):
    """Whether every worker is up, and the load: requests in flight, the KV pool's blocks held
    by sequences (of its total) and, where the server drafts, what drafting kept."""

    ok: bool
    workers: list[WorkerState]
    requests_in_flight: int
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    speculation: SpeculationCounts | None = None
    prefix_looked_up: int = 0
    """Prompt tokens looked up in the prefix cache since the decode worker started."""
    prefix_hit: int = 0
    """Of those, the tokens it held."""


class ServeLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a server lets one client ask of it (`pygemma4 serve --max-...`); a request past
    any of them is refused with an error naming the limit. Beside these, `max_message_bytes`
    bounds every message and HTTP body, `max_pending` the requests in flight from everyone."""

    max_pending_per_client: int = 64
    """Requests in flight from one connection (one HTTP client address) before 'busy'."""
    max_prompt_tokens: int | None = None
    """Tokens of one prompt, after the chat template (None: the context)."""
    max_queued_tokens: int = 1 << 20
    """Prompt tokens of all requests waiting for the decode worker before 'busy'."""
    max_stop_strings: int = MAX_STOP_STRINGS
    """Stop strings of one request."""
    max_stop_chars: int = MAX_STOP_CHARS
    """Characters of one stop string."""
    max_logprobs: int = MAX_LOGPROBS
    """Alternatives' logprobs per token of one request."""

    @classmethod
    def checked(cls, **limits: int) -> ServeLimits:
        """Limits as given (the rest default), refusing those past what the engine takes."""
        most = {
            "max_stop_strings": MAX_STOP_STRINGS,
            "max_stop_chars": MAX_STOP_CHARS,
            "max_logprobs": MAX_LOGPROBS,
        }
        for name, value in limits.items():
            if name in most and value > most[name]:
                raise SamplingParamsError(
                    f"{name} {value} is more than the engine takes ({most[name]})"
                )
        return cls(**limits)


class ServerInfo(_Reply, tag="info"):
    """The model served and the limits a client must respect."""

    model: str
    architecture: str
    vocab_size: int
    n_ctx: int
    max_batch: int
    max_pending: int
    max_message_bytes: int
    protocol_version: int = PROTOCOL_VERSION
    draft: str | None = None
    """The drafter the server decodes with ("ngram", or an assistant GGUF's file name)."""
    draft_tokens: int = 0
    """Tokens it drafts per step."""
    speculation: SpeculationCounts | None = None
    limits: ServeLimits | None = None
    """What one client may ask of the server (None from servers older than the field)."""
    vision: bool = False
    """Whether chats may hold images (`ImageUrlPart`): the server has a vision tower."""
    audio: bool = False
    """Whether chats may hold clips (`InputAudioPart`): the server has an audio tower."""
    max_image_tokens: int = 0
    """Soft tokens an image becomes at most (0 without a vision tower)."""


ServerReply = Chunk | Done | Cancelled | Error | HealthStatus | ServerInfo


# --- Between workers -------------------------------------------------------------------------


class _Internal(_Strict, tag_field="type"):
    pass


class AdmittedRequest(_Internal, tag="admitted"):
    """Front end → tokenizer worker: a client's request, admitted under `rid`, unique
    server-wide."""

    rid: int
    request: GenerationRequest


class EndedRequests(_Internal, tag="ended"):
    """Front end or tokenizer worker → a worker holding these requests: they ended elsewhere
    (cancelled, failed, or stopped by a stop string), so the worker drops them and what they
    hold (the decode worker frees their KV); unknown ids are ignored."""

    rids: list[int]


class MediaFeatures(_Strict):
    """One image or clip of a tokenized prompt, as its tower reads it: its `n_tokens` soft
    tokens start at `offset`; `data` holds its features, float32 [rows, cols] (image
    patches, log-mel frames) in C order; `grid` is an image's (rows, cols) of patches.
    `digest` names its content (what the prefix cache keys its positions by); with
    `bidirectional` its soft tokens attend to each other in both directions."""

    kind: Literal["image", "audio"]
    offset: int
    n_tokens: int
    digest: str
    rows: int
    cols: int
    grid: tuple[int, int] = (0, 0)
    bidirectional: bool = False
    data: bytes = b""
    """Sent as a frame of its own after the message's frame (see `encode_frames`), never
    inside it: the message frame stays small."""


class TokenizedRequest(_Internal, tag="tokenized"):
    """Tokenizer worker → decode worker: a request as token ids, ready to schedule."""

    rid: int
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling  # type: ignore[valid-type]
    stop_token_ids: list[int]
    tokenizer: int
    """Index of the tokenizer worker that gets this request's tokens."""
    speculative: bool = True
    media: list[MediaFeatures] = []
    """The prompt's images and clips, in prompt order (each one's features in a frame of
    its own after the message's)."""


class TokenOutput(_Strict):
    """One request's token from one decode step."""

    rid: int
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: FinishReason | None = None
    cached_tokens: int | None = None
    """On a request's first token: how many of its prompt tokens the KV cache held."""


class StepTokens(_Internal, tag="step"):
    """Decode worker → tokenizer worker: the tokens of one step for that worker's requests."""

    outputs: list[TokenOutput]


class RequestFailure(_Internal, tag="failure"):
    """Decode worker → tokenizer worker: why a request could not run."""

    rid: int
    code: ErrorCode
    message: str


class EncodedReply(_Internal, tag="reply"):
    """Tokenizer worker → front end: an encoded `ServerReply` for request `rid`; `final`
    when it ends the request."""

    rid: int
    final: bool
    reply: msgspec.Raw


class WorkerReady(_Internal, tag="ready"):
    """Worker → front end: the worker has loaded what it needs and serves its inbox."""

    name: str
    pid: int


class DecodeLoad(_Internal, tag="decode_load"):
    """Decode worker → front end: the KV pool's blocks held by sequences now, of its total,
    and what drafting kept so far (sent when they change)."""

    kv_blocks_used: int
    kv_blocks_total: int
    speculation: SpeculationCounts | None = None
    prefix_looked_up: int = 0
    prefix_hit: int = 0


# What each process's inbox takes: anything else that reaches it is a misrouted message.
FrontEndInbox = WorkerReady | EncodedReply | DecodeLoad
TokenizerInbox = AdmittedRequest | StepTokens | RequestFailure | EndedRequests
DecodeInbox = TokenizedRequest | EndedRequests
Internal = FrontEndInbox | TokenizerInbox | DecodeInbox


class KvPoolSpec(_Strict):
    """Where the shared KV pool lives and how it is cut into blocks."""

    kind: Literal["shm", "cuda_ipc"]
    block_size: int
    n_blocks: int
    n_ring_sets: int
    ring_blocks: int
    nbytes: int
    kv_dtype: str
    """The entries' type, one of pygemma4.kv.KV_DTYPES."""
    fd: int = -1
    """shm: a descriptor of the pool's memory file that every worker inherits, under this
    number, from the supervisor (the file has no name, so nothing is left behind whatever
    happens)."""
    ipc_handle: bytes = b""
    """cuda_ipc: the handle of the supervisor's allocation on `device`, which each worker
    opens (it is freed when the supervisor exits)."""
    device: int = -1


# --- Encoding --------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()


def _no_extensions(code: int, data: memoryview) -> typing.NoReturn:
    # Free-form fields (tool parameters, template variables) would otherwise carry msgspec's
    # Ext objects on to code that cannot handle them.
    raise ProtocolError(f"undecodable message: MessagePack extension type {code} is not used")


def encode_frames(message: msgspec.Struct) -> list[bytes]:
    """The frames of a message between workers: the message, then the features of each of
    a `TokenizedRequest`'s media (raw bytes, not MessagePack)."""
    if not isinstance(message, TokenizedRequest) or not message.media:
        return [encode(message)]
    bare = msgspec.structs.replace(
        message, media=[msgspec.structs.replace(m, data=b"") for m in message.media]
    )
    return [encode(bare), *(m.data for m in message.media)]


def _with_frames(message: typing.Any, frames: typing.Sequence[bytes]) -> typing.Any:
    """`message` with the payload frames that followed it put back in place (ProtocolError
    where their number or sizes do not match what it says)."""
    media = message.media if isinstance(message, TokenizedRequest) else []
    if len(frames) != len(media):
        raise ProtocolError(
            f"{type(message).__name__} with {len(media)} media came with {len(frames)} "
            "payload frames"
        )
    if not frames:
        return message
    for i, (m, frame) in enumerate(zip(media, frames, strict=True)):
        if m.rows < 1 or m.cols < 1 or len(frame) != m.rows * m.cols * 4:
            raise ProtocolError(
                f"media[{i}]: a frame of {len(frame)} bytes for float32 [{m.rows}, {m.cols}]"
            )
    return msgspec.structs.replace(
        message,
        media=[
            msgspec.structs.replace(m, data=bytes(frame))
            for m, frame in zip(media, frames, strict=True)
        ],
    )


def _decoder(kind: typing.Any) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind, ext_hook=_no_extensions)


_client_decoder = _decoder(ClientRequest)
_reply_decoder = _decoder(ServerReply)
_internal_decoder = _decoder(Internal)


def encode(message: msgspec.Struct) -> bytes:
    """The message as one frame; ProtocolError where what it carries cannot be sent (an
    integer beyond 64 bits, nesting deeper than the encoder recurses)."""
    try:
        return _encoder.encode(message)
    except (OverflowError, RecursionError) as e:
        raise ProtocolError(f"cannot encode the {type(message).__name__.lower()}: {e}") from None


def _decoded(decoder: msgspec.msgpack.Decoder, frame: bytes) -> typing.Any:
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid message: {e}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        # Text that is not UTF-8 and nesting deeper than the decoder recurses are not
        # DecodeErrors, but are as undecodable.
        raise ProtocolError(f"undecodable message: {e}") from None


def decode_request(frame: bytes) -> ClientRequest:
    """A client's message (ProtocolError naming the problem when it is not one)."""
    return _decoded(_client_decoder, frame)


def decode_reply(frame: bytes) -> ServerReply:
    """A server's reply (ProtocolError when it is not one)."""
    return _decoded(_reply_decoder, frame)


class MisroutedMessageError(ProtocolError):
    """A valid message between workers reached a process whose inbox does not take it."""


def message_types(inbox: typing.Any) -> tuple[type[msgspec.Struct], ...]:
    """The message types of an inbox union (e.g. `DecodeInbox`)."""
    return typing.get_args(inbox) or (inbox,)


class InboxDecoder:
    """Decodes what reaches the inbox of the process `process` as one of the messages of
    `inbox` (one of the `...Inbox` unions)."""

    def __init__(self, process: str, inbox: typing.Any) -> None:
        self.process = process
        self.takes = message_types(inbox)
        self._decoder = _decoder(inbox)

    def decode(self, frame: bytes) -> typing.Any:
        """The message; ProtocolError when the frame is no message between workers,
        MisroutedMessageError (naming the message and the process) when it is one this
        inbox does not take."""
        try:
            return _decoded(self._decoder, frame)
        except ProtocolError:
            message = _decoded(_internal_decoder, frame)
        takes = ", ".join(t.__name__ for t in self.takes)
        raise MisroutedMessageError(
            f"{type(message).__name__} sent to {self.process}, whose inbox takes only {takes}"
        )

    def decode_frames(self, frames: typing.Sequence[bytes]) -> typing.Any:
        """The message of a multipart delivery (`encode_frames`): `decode` of its first
        frame, with the payload frames after it in place."""
        return _with_frames(self.decode(frames[0]), frames[1:])


def request_id_of(frame: bytes) -> int | None:
    """The `id` of a message that failed to decode, when one can still be read from it."""
    try:
        probe = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(probe, dict):
        rid = probe.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63:
            return rid
    return None
