"""The HTTP front end: the OpenAI API (FastAPI on uvicorn) over a pygemma4 server's ZeroMQ
endpoint, spoken to through `AsyncClient`.

`pygemma4 serve` runs it as one more supervised process (`python -m pygemma4.workers.http NAME
EPOCH CONFIG`, the API key in the environment); `pygemma4 http` runs it against a server
elsewhere. Every generation is streamed from the server, also for replies that are not
streamed to the HTTP client, so that one path serves both and the latency metrics see every
token. A client that disconnects has its sequences cancelled on the server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import zmq
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

import pygemma4
from pygemma4 import protocol
from pygemma4.chat_output import (
    ChatOutputDelta,
    ChatOutputStream,
    ToolCallDelta,
    parse_chat_output,
)
from pygemma4.client import (
    AsyncClient,
    AsyncCompletionStream,
    ClientClosedError,
    CompletionResult,
    RequestTimeoutError,
    ServerError,
    StreamChunk,
)
from pygemma4.curve import KeyPair
from pygemma4.errors import Gemma4Error
from pygemma4.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    TokenText,
    Usage,
    bad_field,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    parse_request,
)
from pygemma4.tokenizer import Tokenizer
from pygemma4.workers.http_metrics import Metrics
from pygemma4.workers.runtime import (
    HTTP_API_KEY_ENV,
    HTTP_CURVE_KEYS_ENV,
    HTTP_ROUTING_ID_ENV,
    ServerConfig,
    decode_config,
    supervisor_alive,
)

REQUEST_TIMEOUT_S = 600.0
"""Longest wait for the server's next reply to a request (a long prompt's prefill)."""

INFO_TIMEOUT_S = 10.0
METRICS_HEALTH_TIMEOUT_S = 2.0
SUPERVISOR_POLL_S = 0.5
GRACEFUL_SHUTDOWN_S = 2

_OPEN_PATHS = frozenset({"/health", "/metrics", "/"})
"""Paths answered without the API key (probes, scrapers and the chat page, whose own API
requests carry the key)."""

PAGE_DIR = Path(pygemma4.__file__).resolve().parent / "web"
"""The chat page's files (shipped in the package), served under PAGE_PREFIX; / is its index."""
PAGE_PREFIX = "/web"

# The server's error codes as HTTP statuses and OpenAI error types.
_SERVER_ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "context_length": (400, "invalid_request_error"),
    "too_large": (413, "invalid_request_error"),
    "busy": (429, "rate_limit_error"),
    "worker_failed": (503, "service_unavailable_error"),
    "version": (500, "server_error"),
    "internal": (500, "server_error"),
}


def api_error_of(error: Exception, endpoint: str) -> ApiError:
    """The HTTP error for a failure of the ZeroMQ request."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ServerError):
        status, kind = _SERVER_ERRORS.get(error.code, (500, "server_error"))
        code = "context_length_exceeded" if error.code == "context_length" else error.code
        return ApiError(status, error.message, type=kind, code=code)
    if isinstance(error, (TypeError, ValueError)):
        # The client's own checks of what it is given (token ids, messages, sampling).
        return ApiError(400, str(error), code="invalid_value")
    if isinstance(error, (RequestTimeoutError, ClientClosedError)):
        return ApiError(
            503,
            f"the pygemma4 server at {endpoint} did not answer: {error}",
            type="service_unavailable_error",
            code="server_unavailable",
        )
    return ApiError(500, f"internal error: {error!r}", type="server_error", code="internal")


@dataclass
class Generation:
    """One sequence to generate: a chat or a prompt, its token limit and sampling."""

    chat: bool
    prompt: Any
    max_tokens: int | None
    options: dict[str, Any]
    """The client method's keyword arguments: sampling, ignore_eos, the chat's options."""

    def open(self, client: AsyncClient) -> AsyncCompletionStream:
        method = client.stream_chat if self.chat else client.stream
        return method(self.prompt, self.max_tokens, **self.options)


@dataclass
class ChoiceEvent:
    """What one choice's stream produced: a chunk, its end (`result`), or its failure."""

    index: int
    chunk: StreamChunk | None = None
    result: CompletionResult | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class ServerKeys:
    """What the HTTP front end needs to reach a server that requires CURVE: its own key pair
    (a NAME.key_secret file or a pair in memory) and the server's public key file."""

    own: str | os.PathLike[str] | KeyPair
    server: str | os.PathLike[str]


class Api:
    """The state behind the routes: the ZeroMQ client, the server's info, the tokenizer."""

    def __init__(
        self,
        endpoint: str,
        api_key: str | None,
        tokenizer: Tokenizer | None,
        metrics: Metrics,
        curve_keys: ServerKeys | None,
        routing_id: bytes | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.routing_id = routing_id
        self.in_flight: collections.Counter[str] = collections.Counter()
        """Requests being answered, per client address."""
        self.curve_keys = curve_keys
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.client: AsyncClient | None = None
        self.info: protocol.ServerInfo | None = None
        self.started = now()

    async def server_info(self) -> protocol.ServerInfo:
        """The server's info, asked once (not at start: the server answers clients only
        once every process, this one included, has loaded)."""
        if self.info is None:
            try:
                self.info = await self.zmq().info(timeout=INFO_TIMEOUT_S)
            except Exception as e:
                raise api_error_of(e, self.endpoint) from None
        return self.info

    def zmq(self) -> AsyncClient:
        if self.client is None:
            keys = self.curve_keys
            self.client = AsyncClient(
                self.endpoint,
                timeout=REQUEST_TIMEOUT_S,
                curve_secret_key=None if keys is None else keys.own,
                curve_server_key=None if keys is None else keys.server,
                routing_id=self.routing_id,
            )
        return self.client

    def token_bytes(self) -> TokenText:
        """The bytes of a token id: the tokenizer's, or `token_id:N` without one."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            return lambda token_id: f"token_id:{token_id}".encode()
        return tokenizer.token_bytes

    async def check_model(self, model: str) -> None:
        info = await self.server_info()
        if model != info.model:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {info.model!r}",
                param="model",
                code="model_not_found",
            )

    async def read_json(self, request: Request) -> Any:
        """The request's body as JSON: 413 over the server's message limit, 400 when it is
        not UTF-8 or not JSON."""
        limit = (await self.server_info()).max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise _too_large(len(body), limit)
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the body is not valid UTF-8: {e}", code="invalid_json") from None
        except (ValueError, RecursionError) as e:
            # ValueError beside JSONDecodeError: numbers of more digits than Python converts.
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None

    async def choice_events(self, generations: list[Generation]) -> AsyncIterator[ChoiceEvent]:
        """The events of every sequence, generated in parallel, in the order they come; each
        choice ends with a result or an error. Leaving early cancels what still runs."""
        queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        client = self.zmq()

        async def run(index: int, generation: Generation) -> None:
            try:
                async with generation.open(client) as stream:
                    async for chunk in stream:
                        queue.put_nowait(ChoiceEvent(index, chunk=chunk))
                    queue.put_nowait(ChoiceEvent(index, result=stream.result))
            except Exception as e:
                queue.put_nowait(ChoiceEvent(index, error=e))

        tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(generations)]
        try:
            for _ in range(len(generations)):
                while True:
                    event = await queue.get()
                    yield event
                    if event.chunk is None:
                        break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def measured(
        self, generations: list[Generation], kind: str
    ) -> AsyncIterator[ChoiceEvent]:
        """`choice_events`, recorded in the metrics; the first error ends it (raised)."""
        metrics = self.metrics
        gauges = {"waiting": metrics.waiting, "running": metrics.running}
        states = ["waiting"] * len(generations)
        started = time.monotonic()
        last: dict[int, float] = {}

        def move(index: int, state: str) -> None:
            if states[index] in gauges:
                gauges[states[index]].dec()
            if state in gauges:
                gauges[state].inc()
            states[index] = state

        metrics.waiting.inc(len(generations))
        try:
            async for event in self.choice_events(generations):
                index = event.index
                if event.error is not None:
                    raise event.error
                if event.chunk is not None and event.chunk.token_ids:
                    stamp = time.monotonic()
                    if states[index] == "waiting":
                        move(index, "running")
                        metrics.time_to_first_token.observe(stamp - started)
                    else:
                        gap = (stamp - last[index]) / len(event.chunk.token_ids)
                        for _ in event.chunk.token_ids:
                            metrics.inter_token_latency.observe(gap)
                    last[index] = stamp
                if event.result is not None:
                    move(index, "done")
                    metrics.prompt_tokens.inc(event.result.prompt_tokens)
                    metrics.generation_tokens.inc(event.result.completion_tokens)
                    metrics.end_to_end_latency.observe(time.monotonic() - started)
                    metrics.finished.labels(kind, event.result.finish_reason).inc()
                yield event
        finally:
            for index in range(len(generations)):
                move(index, "done")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the body of {size} bytes exceeds the limit of {limit} bytes",
        code="request_too_large",
    )


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


# --- Chat and completions --------------------------------------------------------------------


def _tool_call_delta(call: ToolCallDelta) -> dict[str, Any]:
    """A streamed tool call fragment in OpenAI's shape (id, type and name come first, once)."""
    if call.id is None:
        return {"index": call.index, "function": {"arguments": call.arguments}}
    return {
        "index": call.index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _chat_finish_reason(reason: str, calls: int) -> str:
    """OpenAI's finish reason of a chat that ended for `reason` having made `calls` calls."""
    return "tool_calls" if calls and reason == "stop" else reason


@dataclass
class Shape:
    """How the choices of one kind of request are shaped: chat (the model's raw text parsed
    into content, reasoning and tool calls) or completions (the text as it is)."""

    chat: bool
    top_logprobs: int
    """How many alternatives each token's logprobs show; -1 where none were asked for."""
    token_bytes: TokenText
    text_lengths: dict[int, int] = field(default_factory=dict)
    """Characters of each completion choice streamed so far (for text_offset)."""
    parsers: dict[int, ChatOutputStream] = field(default_factory=dict)
    """Each streamed chat choice's parser."""

    def logprobs(self, index: int, token_ids: Any, logprobs: Any) -> dict[str, Any] | None:
        if self.top_logprobs < 0 or logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(token_ids, logprobs, self.top_logprobs, self.token_bytes)
        return completion_logprobs(
            token_ids,
            logprobs,
            self.top_logprobs,
            self.token_bytes,
            self.text_lengths.get(index, 0),
        )

    def parser(self, index: int, in_reasoning: bool) -> ChatOutputStream:
        if index not in self.parsers:
            self.parsers[index] = ChatOutputStream(in_reasoning=in_reasoning)
        return self.parsers[index]

    def delta(self, index: int, chunk: StreamChunk) -> dict[str, Any] | None:
        """A streamed choice for `chunk`; None where it adds nothing to show."""
        logprobs = self.logprobs(index, chunk.token_ids, chunk.logprobs)
        if not self.chat:
            self.text_lengths[index] = self.text_lengths.get(index, 0) + len(chunk.text)
            if not chunk.text and logprobs is None:
                return None
            return {"index": index, "text": chunk.text, "logprobs": logprobs, "finish_reason": None}
        parsed = self.parser(index, chunk.in_reasoning).feed(chunk.text)
        if parsed.is_empty() and logprobs is None:
            return None
        return {
            "index": index,
            "delta": _chat_delta(parsed),
            "logprobs": logprobs,
            "finish_reason": None,
        }

    def final(self, index: int, result: CompletionResult) -> dict[str, Any]:
        """A whole choice."""
        logprobs = self.logprobs(index, result.token_ids, result.logprobs)
        if not self.chat:
            return {
                "index": index,
                "text": result.text,
                "logprobs": logprobs,
                "finish_reason": result.finish_reason,
            }
        output = parse_chat_output(result.text, in_reasoning=result.in_reasoning)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": output.content if output.content or not output.tool_calls else None,
            "reasoning_content": output.reasoning,
        }
        if output.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in output.tool_calls
            ]
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": _chat_finish_reason(result.finish_reason, len(output.tool_calls)),
        }

    def stream_end(self, index: int, result: CompletionResult) -> list[dict[str, Any]]:
        """The streamed choices that end a choice: what its parser still held, then the
        finish reason."""
        if not self.chat:
            return [
                {
                    "index": index,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ]
        parser = self.parser(index, result.in_reasoning)
        rest = parser.finish()
        held = (
            []
            if rest.is_empty()
            else [
                {
                    "index": index,
                    "delta": _chat_delta(rest),
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
        reason = _chat_finish_reason(result.finish_reason, parser.calls_started)
        return [*held, {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]


def _chat_delta(parsed: ChatOutputDelta) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if parsed.content:
        delta["content"] = parsed.content
    if parsed.reasoning:
        delta["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        delta["tool_calls"] = [_tool_call_delta(call) for call in parsed.tool_calls]
    return delta


async def generate(
    api: Api,
    request: Request,
    generations: list[Generation],
    shape: Shape,
    model: str,
    *,
    stream: bool,
    include_usage: bool,
    prompts: int,
) -> Response:
    """Run `generations` and reply, streamed or whole. `prompts` is how many distinct prompts
    they have (usage counts each prompt's tokens once)."""
    kind = "chat" if shape.chat else "completion"
    reply_id = new_id("chatcmpl" if shape.chat else "cmpl")
    created = now()
    head = {
        "id": reply_id,
        "object": "chat.completion.chunk" if shape.chat else "text_completion",
        "created": created,
        "model": model,
    }
    per_prompt = len(generations) // prompts

    def counted(usage: Usage, index: int, result: CompletionResult) -> Usage:
        first_of_prompt = index % per_prompt == 0
        if not first_of_prompt:
            return usage.plus(0, result.completion_tokens, 0)
        return usage.plus(result.prompt_tokens, result.completion_tokens, result.cached_tokens)

    if not stream:
        results: dict[int, CompletionResult] = {}
        try:
            events = api.measured(generations, kind)
            await _until_disconnected(request, _collect(events, results))
        except Exception as e:
            api.metrics.errors.labels(_error_kind(e)).inc()
            raise api_error_of(e, api.endpoint) from None
        usage = Usage()
        for index in sorted(results):
            usage = counted(usage, index, results[index])
        return JSONResponse(
            {
                **head,
                "object": "chat.completion" if shape.chat else "text_completion",
                "choices": [shape.final(i, results[i]) for i in sorted(results)],
                "usage": usage.body(),
            }
        )

    async def events() -> AsyncIterator[bytes]:
        usage = Usage()
        extra = {"usage": None} if include_usage else {}
        if shape.chat:
            for index in range(len(generations)):
                choice = {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield _sse({**head, "choices": [choice], **extra})
        try:
            async for event in api.measured(generations, kind):
                if event.chunk is not None:
                    choice = shape.delta(event.index, event.chunk)
                    if choice is not None:
                        yield _sse({**head, "choices": [choice], **extra})
                elif event.result is not None:
                    usage = counted(usage, event.index, event.result)
                    for choice in shape.stream_end(event.index, event.result):
                        yield _sse({**head, "choices": [choice], **extra})
        except Exception as e:
            api.metrics.errors.labels(_error_kind(e)).inc()
            yield _sse(api_error_of(e, api.endpoint).body())
            yield _DONE
            return
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage.body()})
        yield _DONE

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _collect(
    events: AsyncIterator[ChoiceEvent], results: dict[int, CompletionResult]
) -> None:
    async for event in events:
        if event.result is not None:
            results[event.index] = event.result


async def _until_disconnected(request: Request, work: Awaitable[None]) -> None:
    """Await `work`, cancelling it (and so its requests on the server) if the HTTP client
    disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ApiError(499, "the client disconnected", code="client_disconnected")
    task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_kind(error: Exception) -> str:
    if isinstance(error, ApiError):
        return error.code or str(error.status)
    if isinstance(error, ServerError):
        return error.code
    return type(error).__name__


# --- The application -------------------------------------------------------------------------


def create_app(
    endpoint: str,
    *,
    api_key: str | None = None,
    tokenizer: Tokenizer | None = None,
    curve_keys: ServerKeys | None = None,
    routing_id: bytes | None = None,
) -> FastAPI:
    """The OpenAI API over the pygemma4 server at `endpoint` (which requires CURVE where
    `curve_keys` are given, and which knows this front end's connection by `routing_id`, if
    given); with `api_key`, every route but /health and /metrics requires
    `Authorization: Bearer KEY`. Each client address may have as many requests in flight as
    the server's per-client limit."""
    metrics = Metrics()
    api = Api(endpoint, api_key, tokenizer, metrics, curve_keys, routing_id)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if api.client is not None:
            await api.client.close()

    app = FastAPI(
        title="pygemma4", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.api = api

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        if error.status >= 400 and error.status != 499:
            metrics.http_errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = (
            f"no route {request.method} {request.url.path}"
            if error.status_code in (404, 405)
            else str(error.detail)
        )
        metrics.http_errors.labels(str(error.status_code)).inc()
        return JSONResponse(
            ApiError(error.status_code, message, code="not_found").body(),
            status_code=error.status_code,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        metrics.http_errors.labels("500").inc()
        body = ApiError(500, f"internal error: {error!r}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    app.add_middleware(_LimitPerClient, api=api)
    app.add_middleware(_RequireKey, api=api)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_request(ChatCompletionRequest, await api.read_json(request))
        body.check_common()
        body.check_tools()
        await api.check_model(body.model)
        top = body.logprobs_wanted()
        options = {
            **body.sampling(top),
            **body.chat_options(),
            "ignore_eos": body.ignore_eos,
            "raw_text": True,
        }
        messages = [m.wire() for m in body.messages]
        generations = [
            Generation(True, messages, body.max_new_tokens(), _seeded(options, i))
            for i in range(body.n)
        ]
        shape = Shape(True, top if body.logprobs else -1, api.token_bytes())
        return await generate(
            api,
            request,
            generations,
            shape,
            body.model,
            stream=body.stream,
            include_usage=body.include_usage(),
            prompts=1,
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_request(CompletionRequest, await api.read_json(request))
        body.check_common()
        body.check_completion()
        await api.check_model(body.model)
        prompts = body.prompts()
        top = body.logprobs if body.logprobs is not None else -1
        options = {**body.sampling(max(1, top) if top >= 0 else 0), "ignore_eos": body.ignore_eos}
        generations = [
            Generation(False, prompt, body.max_tokens, _seeded(options, i))
            for prompt in prompts
            for i in range(body.n)
        ]
        shape = Shape(False, top, api.token_bytes())
        return await generate(
            api,
            request,
            generations,
            shape,
            body.model,
            stream=body.stream,
            include_usage=body.include_usage(),
            prompts=len(prompts),
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [await model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        await api.check_model(model)
        return await model_card()

    async def model_card() -> dict[str, Any]:
        info = await api.server_info()
        return {
            "id": info.model,
            "object": "model",
            "created": api.started,
            "owned_by": "pygemma4",
            "max_model_len": info.n_ctx,
            "input_modalities": ["text"]
            + (["image"] if info.vision else [])
            + (["audio"] if info.audio else []),
        }

    @app.get("/")
    async def chat_page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html")

    app.mount(PAGE_PREFIX, StaticFiles(directory=PAGE_DIR), name="web")

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            status = await api.zmq().health(timeout=INFO_TIMEOUT_S)
        except Exception as e:
            raise api_error_of(e, api.endpoint) from None
        body = {
            "status": "ok" if status.ok else "degraded",
            "requests_in_flight": status.requests_in_flight,
            "kv_blocks_used": status.kv_blocks_used,
            "kv_blocks_total": status.kv_blocks_total,
            "workers": [
                {"name": w.name, "pid": w.pid, "alive": w.alive, "restarts": w.restarts}
                for w in status.workers
            ],
        }
        return JSONResponse(body, status_code=200 if status.ok else 503)

    @app.get("/metrics")
    async def metrics_page() -> Response:
        # The server's state is read at the scrape; where the server does not answer, the
        # gauges that depend on it read NaN (unknown) rather than a stale value.
        try:
            status = await api.zmq().health(timeout=METRICS_HEALTH_TIMEOUT_S)
        except Gemma4Error:
            status = None
        metrics.observe_server(status)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await api.read_json(request)
        tokenizer = need_tokenizer()
        info = await api.server_info()
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        await api.check_model(body.get("model", info.model))
        unknown = set(body) - {"model", "prompt", "messages", "add_special_tokens"}
        if unknown:
            raise bad_field(sorted(unknown)[0], "unknown field (this API does not take it)")
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise bad_field("add_special_tokens", "add_special_tokens must be a boolean")
        if ("prompt" in body) == ("messages" in body):
            raise bad_field("prompt", "give exactly one of prompt and messages")
        if "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise bad_field("prompt", "prompt must be a string")
            field = "prompt"
            encode = functools.partial(tokenizer.encode, body["prompt"], add_bos=add_special)
        else:
            chat = parse_request(
                ChatCompletionRequest, {"model": info.model, "messages": body["messages"]}
            )
            if any(m.has_media() for m in chat.messages):
                raise bad_field(
                    "messages",
                    "messages with image or audio parts are not counted here: their soft "
                    "tokens depend on the media (a chat completion's usage reports them)",
                )
            field = "messages"
            encode = functools.partial(tokenizer.encode_chat, [m.wire() for m in chat.messages])
        try:
            # In a thread: a chat template may take its whole time limit to render.
            tokens = await asyncio.to_thread(encode)
        except Gemma4Error as e:
            # The text cannot be tokenized, or the chat template refused the messages.
            raise bad_field(field, str(e)) from None
        return {"count": len(tokens), "max_model_len": info.n_ctx, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await api.read_json(request)
        tokenizer = need_tokenizer()
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        await api.check_model(body.get("model", (await api.server_info()).model))
        unknown = set(body) - {"model", "tokens"}
        if unknown:
            raise bad_field(sorted(unknown)[0], "unknown field (this API does not take it)")
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size
            for t in tokens
        ):
            raise bad_field(
                "tokens", f"tokens must be a list of token ids in [0, {tokenizer.vocab_size})"
            )
        return {"prompt": tokenizer.decode(tokens)}

    def need_tokenizer() -> Tokenizer:
        if tokenizer is None:
            raise ApiError(
                501,
                "this HTTP front end was started without the model file, which tokenizing "
                "needs (pygemma4 http --model MODEL)",
                type="server_error",
                code="not_implemented",
            )
        return tokenizer

    return app


class _RequireKey:
    """ASGI middleware: with an API key set, every path but the open ones needs
    `Authorization: Bearer KEY` (else 401)."""

    def __init__(self, app: Any, api: Api) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        key = self.api.api_key
        if scope["type"] == "http" and key is not None and not _open(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode()):
                self.api.metrics.http_errors.labels("401").inc()
                error = ApiError(
                    401,
                    "a valid API key is required (Authorization: Bearer KEY)",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _LimitPerClient:
    """ASGI middleware: a client address with as many POST requests in flight as the
    server's per-client limit gets 429 for more."""

    def __init__(self, app: Any, api: Api) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            limits = (await self.api.server_info()).limits
        except ApiError:
            limits = None  # the route itself answers that the server is unreachable
        address = scope["client"][0] if scope.get("client") else ""
        most = None if limits is None else limits.max_pending_per_client
        if most is not None and self.api.in_flight[address] >= most:
            self.api.metrics.http_errors.labels("429").inc()
            error = ApiError(
                429,
                f"{self.api.in_flight[address]} requests from {address} are in flight, the "
                f"limit per client (--max-pending-per-client {most}); retry when one ends",
                type="rate_limit_error",
                code="busy",
            )
            await JSONResponse(error.body(), status_code=429)(scope, receive, send)
            return
        self.api.in_flight[address] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.api.in_flight[address] -= 1
            if not self.api.in_flight[address]:
                del self.api.in_flight[address]


def _open(path: str) -> bool:
    return path in _OPEN_PATHS or path.startswith(PAGE_PREFIX + "/")


def _seeded(options: dict[str, Any], index: int) -> dict[str, Any]:
    """The options of choice `index`: a seed given is offset per choice, so that the choices
    of one request differ yet are reproducible."""
    if index == 0 or options.get("seed") is None:
        return options
    return {**options, "seed": (options["seed"] + index) % 2**64}


# --- Running -----------------------------------------------------------------------------------


def listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as a host and a port; ValueError when it is not
    one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def bound_socket(listen: str) -> socket.socket:
    """A listening TCP socket on `listen` (HOST:PORT); OSError when it cannot be bound."""
    host, port = listen_address(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn stopped by `stop_signals` and deaf to `ignored_signals`; unlike plain uvicorn it
    does not raise the stopping signal again once shut down, so the process exits normally."""

    def __init__(
        self,
        config: uvicorn.Config,
        stop_signals: tuple[signal.Signals, ...],
        ignored_signals: tuple[signal.Signals, ...] = (),
    ) -> None:
        super().__init__(config)
        self.stop_signals = stop_signals
        self.ignored_signals = ignored_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        for sig in self.ignored_signals:
            signal.signal(sig, signal.SIG_IGN)
        for sig in self.stop_signals:
            signal.signal(sig, self.handle_exit)
        yield


def uvicorn_config(app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        access_log=False,
    )


def run(
    endpoint: str,
    listen: str,
    *,
    api_key: str | None = None,
    tokenizer: Tokenizer | None = None,
    curve_keys: ServerKeys | None = None,
) -> None:
    """Serve the API on `listen` (HOST:PORT) until Ctrl-C or SIGTERM (`pygemma4 http`)."""
    sock = bound_socket(listen)
    app = create_app(endpoint, api_key=api_key, tokenizer=tokenizer, curve_keys=curve_keys)
    server = _Server(uvicorn_config(app), (signal.SIGINT, signal.SIGTERM))
    asyncio.run(server.serve(sockets=[sock]))


async def _serve_supervised(config: ServerConfig, name: str, sock: socket.socket) -> None:
    pair = os.environ.get(HTTP_CURVE_KEYS_ENV)
    app = create_app(
        _connectable(config.endpoint),
        api_key=os.environ.get(HTTP_API_KEY_ENV) or None,
        tokenizer=Tokenizer.from_gguf(config.model),
        curve_keys=(
            None
            if pair is None or config.curve_secret_key is None
            else ServerKeys(KeyPair.from_text(pair), config.curve_secret_key)
        ),
        routing_id=bytes.fromhex(os.environ.get(HTTP_ROUTING_ID_ENV, "")) or None,
    )
    # SIGINT (Ctrl-C in the terminal reaches every process) is the supervisor's to act on.
    server = _Server(uvicorn_config(app), (signal.SIGTERM,), (signal.SIGINT,))

    async def watch_supervisor() -> None:
        while supervisor_alive(config):
            await asyncio.sleep(SUPERVISOR_POLL_S)
        server.should_exit = True

    async def say_ready() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        context = zmq.Context()
        try:
            push = context.socket(zmq.PUSH)
            push.connect(config.inbox("frontend"))
            push.send(protocol.encode(protocol.WorkerReady(name=name, pid=os.getpid())))
            push.close(linger=1000)
        finally:
            context.term()

    watcher = asyncio.create_task(watch_supervisor())
    ready = asyncio.create_task(say_ready())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        ready.cancel()


def _connectable(endpoint: str) -> str:
    """The client's address of the server's endpoint (a wildcard host is this host)."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint.removeprefix(wildcard)
    return endpoint


def main() -> None:
    """`python -m pygemma4.workers.http NAME EPOCH CONFIG`, as the supervisor starts it."""
    name, _epoch, config_text = sys.argv[1:4]
    config = decode_config(config_text)
    assert config.http is not None  # the supervisor starts this process only then
    try:
        sock = bound_socket(config.http)
    except OSError as e:
        print(f"pygemma4 http: cannot listen on {config.http}: {e}", file=sys.stderr)
        sys.exit(1)
    asyncio.run(_serve_supervised(config, name, sock))


if __name__ == "__main__":
    main()
