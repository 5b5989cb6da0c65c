"""Clients of a pygemma4 server: `AsyncClient` for asyncio code and `Client` for threads.

A client holds one ZeroMQ DEALER socket connected to the server's endpoint and speaks the
protocol of `pygemma4.protocol`: each request gets an id of its own, and one reader routes
every reply to the request it answers, so that one client carries any number of requests at
once. Everything a request is given is checked before it is sent; a bad argument raises
TypeError or ValueError (SamplingParamsError for sampling parameters) naming it.

Sampling parameters are keyword arguments named after the fields of `SamplingParams`, with its
defaults: a request samples at temperature 1.0 unless told otherwise; `temperature=0` is
greedy.

A request ends in one of: its result (`CompletionResult`, or the reply to `info` / `health`);
`ServerError` (with the server's error code; `ServerBusyError` and `WorkerFailedError` are
worth retrying); `RequestTimeoutError` when no reply came within the timeout (connecting to an
endpoint where no server listens ends so); `RequestCancelledError` when the server cancelled
it; `BadReplyError` when the server sent something that is not a reply of the protocol; or
`ClientClosedError`. A request that ends on the client's side before the server ended it
(a timeout, a cancelled task, a stream left early) is cancelled on the server too, so that it
stops generating.

Replies for requests no longer waited on are dropped, and so are `Error` replies without an id:
the server sends those for messages it could not read, which this client does not send.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import math
import numbers
import os
import threading
import typing
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import EllipsisType, TracebackType
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import msgspec
import zmq
import zmq.asyncio

from pygemma4 import curve, protocol
from pygemma4.errors import Gemma4Error, require_positive
from pygemma4.protocol import ChatMessage, FinishReason, TokenLogprobs
from pygemma4.sampling import SamplingParams

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncCompletionStream",
    "BadReplyError",
    "Client",
    "ClientClosedError",
    "CompletionResult",
    "CompletionStream",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ServerBusyError",
    "ServerError",
    "StreamChunk",
    "WorkerFailedError",
]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
"""Where `pygemma4 serve` listens unless told otherwise."""

DEFAULT_TIMEOUT = 60.0
"""Seconds a request waits for its next reply unless told otherwise."""

# How long the socket may go on delivering the Cancel messages that closing a client sends for
# its requests in flight (in the background: closing does not wait for it).
_CLOSE_LINGER_MS = 200

_T = TypeVar("_T")
_P = ParamSpec("_P")


# --- Errors ----------------------------------------------------------------------------------


class RequestTimeoutError(Gemma4Error, TimeoutError):
    """A request got no reply (or could not be sent) within its timeout, and was cancelled:
    `what` did not happen at `endpoint` within `timeout` seconds."""

    def __init__(self, what: str, endpoint: str, timeout: float) -> None:
        super().__init__(what, endpoint, timeout)
        self.what = what
        self.endpoint = endpoint
        self.timeout = timeout

    def __str__(self) -> str:
        return f"{self.what} within {self.timeout:g} s"


class ServerError(Gemma4Error):
    """The server ended a request with an error: `code` (a `protocol.ErrorCode`) and a
    `message` saying why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ServerBusyError(ServerError):
    """The server's queue of requests is full ("busy"); the request may be retried later."""


class WorkerFailedError(ServerError):
    """A server worker died while holding the request ("worker_failed"); it may be retried."""


_SERVER_ERRORS: Final[dict[str, type[ServerError]]] = {
    "busy": ServerBusyError,
    "worker_failed": WorkerFailedError,
}


class RequestCancelledError(Gemma4Error):
    """The server cancelled a request this client had not cancelled (e.g. because the client
    did not keep up with its replies)."""


class BadReplyError(protocol.ProtocolError):
    """The server sent something that is not a valid reply to a request of this client."""


class ClientClosedError(Gemma4Error, RuntimeError):
    """The client was closed (or its socket failed) before or while a request ran."""


# --- Results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionResult:
    """A finished generation request."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    """Why it ended: "stop" for an end-of-generation token or a stop string, "length" for
    `max_tokens` or the end of the context."""
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprobs, ...] | None
    """One per generated token where the server reported them, else None."""
    in_reasoning: bool = False
    """A chat whose prompt ended inside an open thought channel: the text starts as
    reasoning."""
    cached_tokens: int = 0
    """Prompt tokens whose KV the server had cached (computed for an earlier request)."""


@dataclass(frozen=True)
class StreamChunk:
    """What one step of a streaming request added (the text may be empty while a stop string
    is still possible)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None
    in_reasoning: bool = False
    """As `CompletionResult.in_reasoning`."""


# --- Argument checks -------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return type(value).__name__


# Iterable, but not a sequence of items: refused where a sequence is asked for.
_NOT_SEQUENCES: Final = (bytes, bytearray, memoryview, Mapping, AbstractSet)


def _checked_timeout(timeout: object) -> float | None:
    """`timeout` as seconds: None (wait forever) or a finite number > 0."""
    if timeout is None:
        return None
    if isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        seconds = float(timeout)
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    raise ValueError(f"timeout must be None or a finite number of seconds > 0, got {timeout!r}")


def _checked_prompt(prompt: object) -> str | list[int]:
    """`prompt` as text, or as a list of token ids each in [0, 2**31)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, _NOT_SEQUENCES) or not isinstance(prompt, Iterable):
        raise TypeError(
            f"prompt must be a str or a sequence of token ids, got {_type_name(prompt)}"
        )
    token_ids: list[int] = []
    for i, token in enumerate(prompt):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"prompt[{i}] must be an integer token id, got {_type_name(token)}")
        token_id = int(token)
        if not 0 <= token_id < 2**31:
            raise ValueError(f"prompt[{i}] must be a token id in [0, 2**31), got {token_id}")
        token_ids.append(token_id)
    if not token_ids:
        raise ValueError("prompt has no token ids: a prompt of ids needs at least one")
    return token_ids


_MESSAGE_KEYS: Final = tuple(f.name for f in msgspec.structs.fields(ChatMessage))
_CONTENT_PARTS: Final = typing.get_args(protocol.ContentPart)


def _checked_messages(messages: object) -> list[ChatMessage]:
    """`messages` as wire messages: each a ChatMessage or a mapping with a str "role", a
    "content" (a str or a list of content parts: text, `image_url` with a data: URI,
    `input_audio` with base64 WAV; None only beside "tool_calls") and optionally the other
    keys of a ChatMessage, in OpenAI's shapes."""
    if isinstance(messages, (str, ChatMessage, *_NOT_SEQUENCES)) or not isinstance(
        messages, Iterable
    ):
        raise TypeError(
            "messages must be a sequence of {'role': ..., 'content': ...} dicts or "
            f"ChatMessage, got {_type_name(messages)}"
        )
    checked: list[ChatMessage] = []
    for i, message in enumerate(messages):
        if isinstance(message, ChatMessage):
            fields: dict[str, Any] = msgspec.structs.asdict(message)
        elif isinstance(message, Mapping):
            unknown = [key for key in message if key not in _MESSAGE_KEYS]
            if unknown:
                raise ValueError(
                    f"messages[{i}] has the unknown key(s) {', '.join(map(repr, unknown))}; "
                    f"a message has only {', '.join(map(repr, _MESSAGE_KEYS))}"
                )
            if "role" not in message:
                raise ValueError(f"messages[{i}] has no 'role'")
            fields = dict(message)
        else:
            raise TypeError(
                f"messages[{i}] must be a dict with 'role' and 'content' or a ChatMessage, "
                f"got {_type_name(message)}"
            )
        role, content = fields["role"], fields.get("content")
        if not isinstance(role, str):
            raise TypeError(f"messages[{i}] role must be a str, got {_type_name(role)}")
        if not role:
            raise ValueError(f"messages[{i}] has an empty role")
        if content is None and not fields.get("tool_calls"):
            raise ValueError(f"messages[{i}] has no 'content'")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise TypeError(
                f"messages[{i}] content must be a str or a list of content parts, "
                f"got {_type_name(content)}"
            )
        for j, part in enumerate(content if isinstance(content, (list, tuple)) else ()):
            if not isinstance(part, (Mapping, *_CONTENT_PARTS)):
                raise TypeError(
                    f"messages[{i}] content[{j}] must be a content part {{'type': 'text' | "
                    f"'image_url' | 'input_audio', ...}}, got {_type_name(part)}"
                )
        checked.append(_converted(f"messages[{i}]", fields, ChatMessage))
    if not checked:
        raise ValueError("messages is empty: a chat needs at least one message")
    return checked


def _converted(what: str, value: object, kind: Any) -> Any:
    """`value` (plain data or structs) as the wire type `kind`; ValueError naming `what` and
    the field where it does not fit."""
    try:
        return msgspec.convert(msgspec.to_builtins(value), kind)
    except (msgspec.ValidationError, TypeError) as e:
        raise ValueError(f"{what}: {e}") from None


def _checked_tools(tools: object) -> list[protocol.ToolDefinition] | None:
    """`tools` (OpenAI tool definitions, as mappings or ToolDefinitions) as wire tools."""
    if tools is None:
        return None
    if isinstance(tools, (str, Mapping, *_NOT_SEQUENCES)) or not isinstance(tools, Iterable):
        raise TypeError(f"tools must be a sequence of tool definitions, got {_type_name(tools)}")
    return [_converted(f"tools[{i}]", t, protocol.ToolDefinition) for i, t in enumerate(tools)]


def _checked_template_kwargs(kwargs: object) -> dict[str, Any] | None:
    if kwargs is None:
        return None
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(
            f"chat_template_kwargs must be a mapping with str keys, got {_type_name(kwargs)}"
        )
    return _converted("chat_template_kwargs", kwargs, dict[str, Any])


def _chat_fields(
    messages: object,
    tools: object,
    chat_template_kwargs: object,
    raw_text: object,
    max_image_tokens: object,
) -> dict[str, Any]:
    """The checked fields of a Chat request beyond those of every generation request (the
    server checks `max_image_tokens` against its budgets)."""
    if max_image_tokens is not None and (
        isinstance(max_image_tokens, bool) or not isinstance(max_image_tokens, int)
    ):
        raise TypeError(f"max_image_tokens must be an int, got {_type_name(max_image_tokens)}")
    return {
        "messages": _checked_messages(messages),
        "tools": _checked_tools(tools),
        "chat_template_kwargs": _checked_template_kwargs(chat_template_kwargs),
        "raw_text": _checked_flag("raw_text", raw_text),
        "max_image_tokens": max_image_tokens,
    }


def _checked_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)}")
    return value


def _encoded(message: msgspec.Struct) -> bytes:
    try:
        return protocol.encode(message)
    except UnicodeEncodeError as e:
        raise ValueError(f"the request holds text that is not valid Unicode: {e}") from None


# --- One request in flight -------------------------------------------------------------------

_GENERATION_REPLIES: Final = (protocol.Done, protocol.Cancelled, protocol.Error)
_STREAM_REPLIES: Final = (protocol.Chunk, *_GENERATION_REPLIES)


class _Abandoned:
    """Put in a call's queue when its stream is cancelled while a task waits on it."""


_ABANDONED: Final = _Abandoned()


class _Call:
    """A request: its encoded message, the reply types it may get and the queue the reader
    routes them to."""

    __slots__ = ("expects", "frame", "kind", "replies", "rid", "timeout")

    def __init__(
        self,
        message: protocol.ClientRequest,
        expects: tuple[type, ...],
        timeout: float | None,
    ) -> None:
        self.rid = message.id
        self.kind = str(message.__struct_config__.tag)
        self.frame = _encoded(message)
        self.expects = expects
        self.timeout = timeout
        self.replies: asyncio.Queue[protocol.ServerReply | Exception | _Abandoned] = asyncio.Queue()

    @property
    def generates(self) -> bool:
        """Whether the server may be generating for it, so that stopping it needs a Cancel."""
        return self.kind in ("completion", "chat")

    def __str__(self) -> str:
        return f"request {self.rid} ({self.kind})"


# --- asyncio ---------------------------------------------------------------------------------


class AsyncClient:
    """A client of a pygemma4 server for asyncio code; any number of tasks of one event loop
    (the first it is used in) may run requests on it at once.

    `timeout` is the longest wait, in seconds, for the next reply of a request (None: no
    limit); every request method takes a `timeout` of its own (the default, `...`, keeps the
    client's). Use it as `async with AsyncClient() as
    client:`, or call `close()`.

    A server that requires CURVE takes `curve_secret_key` (this client's NAME.key_secret
    file, or a `curve.KeyPair`) and `curve_server_key` (the server's public NAME.key file);
    see `pygemma4 keygen`. `routing_id` names the connection to the server (a server's own
    HTTP front end uses the one it was given, which the per-client limit spares).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        curve_secret_key: str | os.PathLike[str] | curve.KeyPair | None = None,
        curve_server_key: str | os.PathLike[str] | None = None,
        routing_id: bytes | None = None,
    ) -> None:
        if not isinstance(endpoint, str):
            raise TypeError(f"endpoint must be a str, got {_type_name(endpoint)}")
        if (curve_secret_key is None) != (curve_server_key is None):
            raise ValueError("curve_secret_key and curve_server_key go together")
        self.endpoint = endpoint
        self.timeout = _checked_timeout(timeout)
        socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            socket.routing_id = routing_id
        if curve_secret_key is not None and curve_server_key is not None:
            try:
                public, secret = curve.load_secret(curve_secret_key)
                socket.curve_serverkey = curve.load_public(curve_server_key)
            except curve.CurveKeyError:
                socket.close()
                raise
            socket.curve_publickey = public
            socket.curve_secretkey = secret
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as e:
            socket.close()
            raise ValueError(f"cannot connect to {endpoint!r}: {e}") from None
        self._socket = socket
        self._ids = itertools.count()
        self._pending: dict[int, _Call] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed_because: str | None = None

    @property
    def closed(self) -> bool:
        """Whether the client was closed (or its socket failed)."""
        return self._closed_because is not None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket; every request in flight raises ClientClosedError and is cancelled
        on the server. Closing again does nothing."""
        self._shut_down(f"the client of {self.endpoint} is closed")
        reader = self._reader
        if reader is not None and self._loop is asyncio.get_running_loop():
            await asyncio.wait([reader])

    # --- requests ----------------------------------------------------------------------------

    async def complete(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = None,
        *,
        ignore_eos: bool = False,
        speculative: bool = True,
        timeout: float | None | EllipsisType = ...,
        **sampling: Any,
    ) -> CompletionResult:
        """Continue `prompt` (text, tokenized with a leading BOS, or token ids as they are) by
        at most `max_tokens` tokens (None: up to the end of the context). Where the server
        drafts, `speculative=False` decodes this request one token per step."""
        fields = {"prompt": _checked_prompt(prompt)}
        call = self._generation(
            protocol.Completion,
            fields,
            max_tokens,
            timeout,
            sampling,
            stream=False,
            ignore_eos=ignore_eos,
            speculative=speculative,
        )
        return await self._generate(call)

    async def chat(
        self,
        messages: Iterable[Mapping[str, Any] | ChatMessage],
        max_tokens: int | None = None,
        *,
        tools: Iterable[Mapping[str, Any] | protocol.ToolDefinition] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        raw_text: bool = False,
        max_image_tokens: int | None = None,
        ignore_eos: bool = False,
        speculative: bool = True,
        timeout: float | None | EllipsisType = ...,
        **sampling: Any,
    ) -> CompletionResult:
        """Answer a conversation (each message {"role", "content", ...} in OpenAI's shape, or
        a ChatMessage) rendered through the model's chat template, with `tools` (OpenAI tool
        definitions) and `chat_template_kwargs` (e.g. {"enable_thinking": True}) given to the
        template. With `raw_text` the text keeps the special tokens' texts, for
        `pygemma4.chat_output`; the result's `in_reasoning` says whether it starts as
        reasoning. A server started with --mmproj takes images (`{"type": "image_url",
        "image_url": {"url": "data:image/png;base64,..."}}`) and clips (`{"type":
        "input_audio", "input_audio": {"data": <base64 WAV>, "format": "wav"}}`) among the
        content parts (`info()` says which); each image gets at most `max_image_tokens` soft
        tokens (70, 140, 280, 560, 1120; by default and at most the server's), unless its
        `image_url.detail` asks for "low" (70) or "high" (the server's most)."""
        fields = _chat_fields(messages, tools, chat_template_kwargs, raw_text, max_image_tokens)
        call = self._generation(
            protocol.Chat,
            fields,
            max_tokens,
            timeout,
            sampling,
            stream=False,
            ignore_eos=ignore_eos,
            speculative=speculative,
        )
        return await self._generate(call)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = None,
        *,
        ignore_eos: bool = False,
        speculative: bool = True,
        timeout: float | None | EllipsisType = ...,
        **sampling: Any,
    ) -> AsyncCompletionStream:
        """`complete`, streamed: an async iterator of the chunks, which sends the request when
        first iterated (the arguments are checked here)."""
        fields = {"prompt": _checked_prompt(prompt)}
        call = self._generation(
            protocol.Completion,
            fields,
            max_tokens,
            timeout,
            sampling,
            stream=True,
            ignore_eos=ignore_eos,
            speculative=speculative,
        )
        return AsyncCompletionStream(self, call)

    def stream_chat(
        self,
        messages: Iterable[Mapping[str, Any] | ChatMessage],
        max_tokens: int | None = None,
        *,
        tools: Iterable[Mapping[str, Any] | protocol.ToolDefinition] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        raw_text: bool = False,
        max_image_tokens: int | None = None,
        ignore_eos: bool = False,
        speculative: bool = True,
        timeout: float | None | EllipsisType = ...,
        **sampling: Any,
    ) -> AsyncCompletionStream:
        """`chat`, streamed, as `stream` is (each chunk's `in_reasoning` as the result's)."""
        fields = _chat_fields(messages, tools, chat_template_kwargs, raw_text, max_image_tokens)
        call = self._generation(
            protocol.Chat,
            fields,
            max_tokens,
            timeout,
            sampling,
            stream=True,
            ignore_eos=ignore_eos,
            speculative=speculative,
        )
        return AsyncCompletionStream(self, call)

    async def info(self, *, timeout: float | None | EllipsisType = ...) -> protocol.ServerInfo:
        """The model served and the server's limits."""
        message = protocol.Info(id=next(self._ids))
        call = _Call(message, (protocol.ServerInfo, protocol.Error), self._timeout(timeout))
        reply = await self._single(call)
        assert isinstance(reply, protocol.ServerInfo)  # guaranteed by call.expects
        return reply

    async def health(self, *, timeout: float | None | EllipsisType = ...) -> protocol.HealthStatus:
        """Whether the server's workers are up, and its load."""
        message = protocol.Health(id=next(self._ids))
        call = _Call(message, (protocol.HealthStatus, protocol.Error), self._timeout(timeout))
        reply = await self._single(call)
        assert isinstance(reply, protocol.HealthStatus)  # guaranteed by call.expects
        return reply

    # --- building requests -------------------------------------------------------------------

    def _timeout(self, timeout: object) -> float | None:
        return self.timeout if timeout is ... else _checked_timeout(timeout)

    def _generation(
        self,
        kind: type[protocol.Completion] | type[protocol.Chat],
        fields: Mapping[str, Any],
        max_tokens: int | None,
        timeout: object,
        sampling: Mapping[str, object],
        *,
        stream: bool,
        ignore_eos: object,
        speculative: object,
    ) -> _Call:
        """A checked generation request, not sent yet."""
        if max_tokens is not None:
            require_positive("max_tokens", max_tokens)
        message = kind(
            id=next(self._ids),
            max_tokens=max_tokens,
            sampling=protocol.wire_sampling(SamplingParams.from_mapping(sampling)),
            stream=stream,
            ignore_eos=_checked_flag("ignore_eos", ignore_eos),
            speculative=_checked_flag("speculative", speculative),
            **fields,
        )
        expects = _STREAM_REPLIES if stream else _GENERATION_REPLIES
        return _Call(message, expects, self._timeout(timeout))

    # --- running requests --------------------------------------------------------------------

    async def _generate(self, call: _Call) -> CompletionResult:
        done = await self._single(call)
        assert isinstance(done, protocol.Done)  # guaranteed by call.expects
        return CompletionResult(
            text=done.text,
            token_ids=tuple(done.token_ids),
            finish_reason=done.finish_reason,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            logprobs=None if done.logprobs is None else tuple(done.logprobs),
            in_reasoning=done.in_reasoning,
            cached_tokens=done.cached_tokens,
        )

    async def _single(self, call: _Call) -> protocol.ServerReply:
        """Send a request answered by one reply, and return that reply."""
        await self._open(call)
        reply = await self._receive(call)
        assert not isinstance(reply, _Abandoned)  # only streams are abandoned
        return reply

    async def _open(self, call: _Call) -> None:
        """Register `call` for its replies and send it."""
        if self._closed_because is not None:
            raise ClientClosedError(self._closed_because)
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._reader = loop.create_task(self._read())
        elif loop is not self._loop:
            raise RuntimeError("an AsyncClient can only be used in the event loop it first ran in")
        self._pending[call.rid] = call
        sent = asyncio.ensure_future(self._socket.send(call.frame))
        try:
            await asyncio.wait_for(sent, call.timeout)
        except BaseException as e:
            # Sent but interrupted right after: the server has it, so it must be cancelled.
            went_out = sent.done() and not sent.cancelled() and sent.exception() is None
            self._release(call, cancel=went_out)
            if isinstance(e, asyncio.TimeoutError):
                raise self._timeout_error(
                    call, f"could not send {call} to {self.endpoint}"
                ) from None
            if isinstance(e, asyncio.CancelledError) and self._closed_because is not None:
                # Closing the socket cancels the sends it still held.
                raise ClientClosedError(self._closed_because) from None
            raise

    async def _receive(self, call: _Call) -> protocol.ServerReply | _Abandoned:
        """The next reply to `call`: a Chunk, or the reply that ends it (after which `call` is
        released); raises for an error, a cancel by the server, an unexpected reply or no
        reply within the timeout (after which `call` is released, and cancelled on the server
        where it had not ended there)."""
        if call.replies.empty():
            try:
                item = await asyncio.wait_for(call.replies.get(), call.timeout)
            except asyncio.TimeoutError:
                self._release(call, cancel=True)
                raise self._timeout_error(
                    call, f"no reply to {call} from {self.endpoint}"
                ) from None
            except BaseException:
                self._release(call, cancel=True)
                raise
        else:
            item = call.replies.get_nowait()
        if isinstance(item, Exception):
            self._release(call, cancel=True)
            raise item
        if isinstance(item, _Abandoned):
            return item
        if not isinstance(item, call.expects):
            self._release(call, cancel=True)
            raise BadReplyError(
                f"{self.endpoint} answered {call} with a {item.__struct_config__.tag!r} reply"
            )
        if isinstance(item, protocol.Chunk):
            return item
        self._release(call, cancel=False)
        if isinstance(item, protocol.Error):
            raise _SERVER_ERRORS.get(item.code, ServerError)(item.code, item.message)
        if isinstance(item, protocol.Cancelled):
            raise RequestCancelledError(f"{self.endpoint} cancelled {call}")
        return item

    def _timeout_error(self, call: _Call, what: str) -> RequestTimeoutError:
        assert call.timeout is not None  # no timeout, no timeout error
        return RequestTimeoutError(what, self.endpoint, call.timeout)

    def _release(self, call: _Call, *, cancel: bool) -> None:
        """Stop routing replies to `call` (replies that still come for it are dropped); with
        `cancel`, also ask the server to stop it where it may be generating."""
        if self._pending.pop(call.rid, None) is not None and cancel and call.generates:
            self._send_cancel(call)

    def _abandon(self, call: _Call) -> None:
        """Cancel `call` on the server and wake whoever waits on its replies."""
        if call.rid in self._pending:
            self._release(call, cancel=True)
            call.replies.put_nowait(_ABANDONED)

    def _abandon_soon(self, call: _Call) -> None:
        """`_abandon`, from any thread (a stream collected mid-way)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            # The loop may close in between: the socket is gone with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._abandon, call)

    def _send_cancel(self, call: _Call) -> None:
        cancel = protocol.encode(protocol.Cancel(id=call.rid))
        sent = asyncio.ensure_future(self._socket.send(cancel, flags=zmq.DONTWAIT))
        # A Cancel that finds the send queue full is lost: the server is not reading anyway,
        # and it drops the requests of a client it cannot reach.
        sent.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _read(self) -> None:
        """Route each reply to the request it answers until the client closes (dropping those
        that answer no request waited on)."""
        try:
            while True:
                frames = await self._socket.recv_multipart()
                try:
                    if len(frames) != 1:
                        raise BadReplyError(f"a reply of {len(frames)} frames, not 1")
                    reply = protocol.decode_reply(frames[0])
                except protocol.ProtocolError as e:
                    # Garbage may have been meant for any request: none can trust the stream.
                    for waiting in self._pending.values():
                        waiting.replies.put_nowait(
                            BadReplyError(f"{self.endpoint} sent a reply that is not valid: {e}")
                        )
                    continue
                call = self._pending.get(reply.id) if reply.id is not None else None
                if call is not None:
                    call.replies.put_nowait(reply)
        except Exception as e:
            # Without its reader no request would ever end: end them all, saying why.
            self._shut_down(f"the client of {self.endpoint} failed: {e!r}")

    def _shut_down(self, reason: str) -> None:
        """Close the socket and end every request in flight with ClientClosedError(`reason`),
        cancelling each on the server; the first reason stays."""
        if self._closed_because is not None:
            return
        self._closed_because = reason
        calls = list(self._pending.values())
        self._pending.clear()
        cancels = [call for call in calls if call.generates]
        for call in cancels:
            self._send_cancel(call)
        for call in calls:
            call.replies.put_nowait(ClientClosedError(reason))
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._socket.close(linger=_CLOSE_LINGER_MS if cancels else 0)


class AsyncCompletionStream:
    """The chunks of a streaming request, as an async iterator; it sends the request when first
    iterated.

    After the last chunk, `result` holds the whole `CompletionResult`. `cancel()` (or
    `aclose()`, or leaving `async with stream:`) stops the request on the server and ends the
    iteration quietly, dropping what was not read yet. A stream left early in a plain `async
    for` is cancelled once it is garbage collected (at once in CPython, unless something
    still refers to it); `async with` makes it certain.
    """

    def __init__(self, client: AsyncClient, call: _Call) -> None:
        self._started = False
        self._finished = False
        self._reading = False
        self._client = client
        self._call = call
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprobs] | None = None
        self.result: CompletionResult | None = None
        """The whole result, once the last chunk was read; None before, or when the request
        ended otherwise."""
        self.cancelled = False
        """Whether `cancel()` stopped the request before it finished."""

    @property
    def finished(self) -> bool:
        """Whether the stream has ended (finished, cancelled or failed)."""
        return self._finished

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._reading:
            raise RuntimeError("this stream is already being read by another task")
        if self._finished:
            raise StopAsyncIteration
        self._reading = True
        try:
            return await self._next_chunk()
        except BaseException:
            self._finished = True
            raise
        finally:
            self._reading = False

    async def _next_chunk(self) -> StreamChunk:
        client, call = self._client, self._call
        if not self._started:
            self._started = True
            await client._open(call)
        reply = await client._receive(call)
        if isinstance(reply, _Abandoned):
            raise StopAsyncIteration
        if isinstance(reply, protocol.Chunk):
            self._text.append(reply.text)
            self._token_ids.extend(reply.token_ids)
            if reply.logprobs is not None:
                if self._logprobs is None:
                    self._logprobs = []
                self._logprobs.extend(reply.logprobs)
            return StreamChunk(
                text=reply.text,
                token_ids=tuple(reply.token_ids),
                logprobs=None if reply.logprobs is None else tuple(reply.logprobs),
                in_reasoning=reply.in_reasoning,
            )
        assert isinstance(reply, protocol.Done)  # guaranteed by call.expects
        if reply.text or reply.token_ids or reply.logprobs:
            raise BadReplyError(
                f"{client.endpoint} ended the streamed {call} with text or tokens of its own"
            )
        self.result = CompletionResult(
            text="".join(self._text),
            token_ids=tuple(self._token_ids),
            finish_reason=reply.finish_reason,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            logprobs=None if self._logprobs is None else tuple(self._logprobs),
            in_reasoning=reply.in_reasoning,
            cached_tokens=reply.cached_tokens,
        )
        raise StopAsyncIteration

    async def cancel(self) -> None:
        """Stop the request on the server (if it was sent and has not ended) and end this
        stream; replies not read yet are dropped. Does nothing once the stream has ended."""
        if self._finished:
            return
        self._finished = True
        self.cancelled = True
        if self._started:
            self._client._abandon(self._call)

    async def aclose(self) -> None:
        """`cancel()`, under the name async iterators close by."""
        await self.cancel()

    async def __aenter__(self) -> AsyncCompletionStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cancel()

    def __del__(self) -> None:
        # Leaving an `async for` early must not leave the server generating.
        if self._started and not self._finished:
            self._client._abandon_soon(self._call)


# --- threads ---------------------------------------------------------------------------------


def _twin(
    method: Callable[Concatenate[AsyncClient, _P], Any], doc: str, returns: str | None = None
) -> Callable[[Callable[..., _T]], Callable[Concatenate[Client, _P], _T]]:
    """Dress the decorated function as the `Client` twin of the `AsyncClient` `method`: the
    same name and parameters, the docstring `doc`, and the same return annotation unless
    `returns` names another."""

    def dress(function: Callable[..., _T]) -> Callable[Concatenate[Client, _P], _T]:
        signature = inspect.signature(method)
        if returns is not None:
            signature = signature.replace(return_annotation=returns)
        function.__name__ = method.__name__
        function.__qualname__ = f"Client.{method.__name__}"
        function.__doc__ = doc
        function.__signature__ = signature  # type: ignore[attr-defined]
        function.__annotations__ = {
            **method.__annotations__,
            "return": signature.return_annotation,
        }
        return function

    return dress


def _blocking(
    method: Callable[Concatenate[AsyncClient, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Client, _P], _T]:
    """The `Client` twin of a coroutine method of `AsyncClient`: it runs the coroutine on the
    client's loop and waits for its outcome."""

    @_twin(method, f"`AsyncClient.{method.__name__}`, blocking.")
    def blocking(self: Client, *args: Any, **kwargs: Any) -> _T:
        return self._run(method(self._client, *args, **kwargs))

    return blocking


def _iterating(
    method: Callable[Concatenate[AsyncClient, _P], AsyncCompletionStream],
) -> Callable[Concatenate[Client, _P], CompletionStream]:
    """The `Client` twin of a method of `AsyncClient` that makes a stream: the same stream, as
    a plain iterator."""

    @_twin(method, f"`AsyncClient.{method.__name__}`, as a plain iterator.", "CompletionStream")
    def iterating(self: Client, *args: Any, **kwargs: Any) -> CompletionStream:
        return CompletionStream(self, method(self._client, *args, **kwargs))

    return iterating


class Client:
    """A client of a pygemma4 server for synchronous code, safe to use from many threads at
    once: an `AsyncClient` running in an event loop on a daemon thread of its own.

    Its methods are those of `AsyncClient`, blocking; `stream` and `stream_chat` return plain
    iterators. Use it as `with Client() as client:`, or call `close()`.
    """

    @_twin(AsyncClient.__init__, "See `AsyncClient`.")
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._client = AsyncClient(*args, **kwargs)
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"pygemma4 client {self.endpoint}", daemon=True
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return self._client.endpoint

    @property
    def timeout(self) -> float | None:
        """The longest wait, in seconds, for the next reply of a request (None: no limit)."""
        return self._client.timeout

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the client (requests in flight raise ClientClosedError) and stop its thread.
        Closing again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    async def _shut_down(self) -> None:
        await self._client.close()
        # The requests of other threads end with ClientClosedError: let them, so that no thread
        # is left waiting on a loop that stopped.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others)

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` on the client's loop and wait for its outcome."""
        with self._lock:
            if self._closed:
                coroutine.close()
                raise ClientClosedError(f"the client of {self.endpoint} is closed")
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        finally:
            # Cancels the request when the wait was interrupted (KeyboardInterrupt); no-op else.
            future.cancel()

    complete = _blocking(AsyncClient.complete)
    chat = _blocking(AsyncClient.chat)
    stream = _iterating(AsyncClient.stream)
    stream_chat = _iterating(AsyncClient.stream_chat)
    info = _blocking(AsyncClient.info)
    health = _blocking(AsyncClient.health)


class CompletionStream:
    """The chunks of a streaming request of a `Client`, as a plain iterator: an
    `AsyncCompletionStream` read from the client's loop, one chunk per `next()`.

    `result`, `cancelled` and `cancel()` are those of the `AsyncCompletionStream`; `close()`
    and leaving `with stream:` cancel as well.
    """

    def __init__(self, client: Client, stream: AsyncCompletionStream) -> None:
        self._client = client
        self._stream = stream

    @property
    def result(self) -> CompletionResult | None:
        return self._stream.result

    @property
    def cancelled(self) -> bool:
        return self._stream.cancelled

    @property
    def finished(self) -> bool:
        return self._stream.finished

    def __iter__(self) -> Iterator[StreamChunk]:
        return self

    def __next__(self) -> StreamChunk:
        if self._stream.finished:
            raise StopIteration
        try:
            return self._client._run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def cancel(self) -> None:
        """Stop the request on the server and end this stream (see
        `AsyncCompletionStream.cancel`)."""
        if not self._stream.finished:
            # A closed client has already stopped every request.
            with contextlib.suppress(ClientClosedError):
                self._client._run(self._stream.cancel())

    def close(self) -> None:
        """`cancel()`, under the name iterators close by."""
        self.cancel()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()
