"""The tokenizer worker: turns requests into token ids for the decode worker, and the tokens
that come back into the replies clients receive (text never split inside a character, stop
strings cut)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from pygemma4 import protocol
from pygemma4.chat_output import CHANNEL_CLOSE, CHANNEL_OPEN, TOOL_RESPONSE
from pygemma4.config import open_model
from pygemma4.errors import Gemma4Error
from pygemma4.generation import FinishReason, TextStream, room_for_tokens
from pygemma4.media.kinds import AUDIO, IMAGE, PreparedMedia
from pygemma4.media.prepared import MediaPreprocessor, open_projector
from pygemma4.multimodal import MediaPart, PreparedPrompt, prepare_chat
from pygemma4.protocol import (
    AdmittedRequest,
    Chat,
    ChatMessage,
    Completion,
    EncodedReply,
    EndedRequests,
    Error,
    ErrorCode,
    RequestFailure,
    StepTokens,
    TokenizedRequest,
    TokenLogprobs,
    TokenOutput,
)
from pygemma4.sampling import SamplingParams
from pygemma4.tokenizer import Tokenizer
from pygemma4.workers.runtime import ServerConfig, Worker, media_features, run_worker


class RequestRefused(Gemma4Error):
    """A request that cannot run, with the error code its reply carries."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# Chat variables that are fields of the request, which chat_template_kwargs may not set.
_REQUEST_VARIABLES = ("messages", "tools", "add_generation_prompt")


def chat_template_input(request: Chat) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and the keyword arguments that the chat template renders `request` with:
    OpenAI's shapes as Gemma 4 templates read them."""
    variables = dict(request.chat_template_kwargs or {})
    clashes = [name for name in _REQUEST_VARIABLES if name in variables]
    if clashes:
        raise RequestRefused(
            "bad_request",
            f"chat_template_kwargs may not set {', '.join(clashes)}: "
            "they come from the request's own fields",
        )
    if request.tools is not None:
        variables["tools"] = [
            {"type": tool.type, "function": msgspec.to_builtins(tool.function)}
            for tool in request.tools
        ]
    messages = [_template_message(i, m) for i, m in enumerate(request.messages)]
    return messages, variables


def _template_message(index: int, message: ChatMessage) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(message)
    if message.role == "developer":
        data["role"] = "system"
    if message.content is None:
        if not message.tool_calls:
            raise RequestRefused("bad_request", f"messages[{index}] has no content")
        data["content"] = ""
    for j, call in enumerate(message.tool_calls or ()):
        arguments = call.function.arguments
        where = f"messages[{index}].tool_calls[{j}].function.arguments"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise RequestRefused("bad_request", f"{where} is not JSON: {e}") from None
        if not isinstance(arguments, dict):
            raise RequestRefused("bad_request", f"{where} is not a JSON object")
        data["tool_calls"][j] = {
            **({"id": call.id} if call.id is not None else {}),
            "type": call.type,
            "function": {"name": call.function.name, "arguments": arguments},
        }
    return data


def stop_token_ids(tokenizer: Tokenizer, request: Completion | Chat) -> set[int]:
    """The tokens that end the request's generation: the model's end-of-generation tokens, and
    for a chat with tools `<|tool_response>`, which the model writes after its calls to wait
    for their results."""
    stops = set(tokenizer.end_of_generation_ids)
    tool_response = tokenizer.token_id(TOOL_RESPONSE)
    if isinstance(request, Chat) and request.tools and tool_response is not None:
        stops.add(tool_response)
    return stops


def ends_in_open_channel(tokenizer: Tokenizer, prompt: list[int]) -> bool:
    """Whether the prompt ends inside a thought channel it opened and did not close."""
    opening, closing = tokenizer.token_id(CHANNEL_OPEN), tokenizer.token_id(CHANNEL_CLOSE)
    if opening is None:
        return False
    for token in reversed(prompt):
        if token == opening:
            return True
        if token == closing:
            return False
    return False


@dataclass
class TextState:
    """What the worker keeps of one request while it generates."""

    client_id: int
    stream: bool
    logprobs: bool
    prompt_tokens: int
    text: TextStream
    in_reasoning: bool = False
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    token_logprobs: list[TokenLogprobs] = field(default_factory=list)


class TokenizerWorker(Worker):
    """Serves the inbox of one tokenizer worker."""

    def __init__(self, config: ServerConfig, name: str, epoch: int) -> None:
        super().__init__(config, name, ["frontend", "decode"])
        self.index = config.tokenizer_names().index(name)
        model = open_model(config.model)
        self.tokenizer = Tokenizer.from_metadata(model.gguf.metadata)
        self.vocab_size = model.config.vocab_size
        self.media = (
            None
            if config.mmproj is None
            else MediaPreprocessor(open_projector(config.mmproj, model), config.max_image_tokens)
        )
        """What decodes and preprocesses images and clips (None: the server takes none)."""
        self.requests: dict[int, TextState] = {}

    def start(self, admitted: AdmittedRequest) -> None:
        """Tokenize a request and hand it to the decode worker, or refuse it."""
        rid, request = admitted.rid, admitted.request
        try:
            sampling = protocol.sampling_params(request.sampling)
            self.check_limits(sampling)
            prepared = self.prompt(request)
            prompt = prepared.token_ids.tolist()
            self.check_prompt_length(len(prompt))
            max_tokens = self.max_tokens(len(prompt), request.max_tokens)
            text = TextStream(self.tokenizer, sampling.stop, skip_special=not request.raw_text)
        except RequestRefused as e:
            self.reply_error(rid, e.code, str(e), request.id)
            return
        except (Gemma4Error, ValueError) as e:
            self.reply_error(rid, "bad_request", str(e), request.id)
            return
        self.requests[rid] = TextState(
            client_id=request.id,
            stream=request.stream,
            logprobs=sampling.logprobs > 0,
            prompt_tokens=len(prompt),
            text=text,
            in_reasoning=isinstance(request, Chat) and ends_in_open_channel(self.tokenizer, prompt),
        )
        stop_ids = [] if request.ignore_eos else sorted(stop_token_ids(self.tokenizer, request))
        self.mail.send(
            "decode",
            TokenizedRequest(
                rid=rid,
                prompt_ids=prompt,
                max_tokens=max_tokens,
                sampling=request.sampling,
                stop_token_ids=stop_ids,
                tokenizer=self.index,
                speculative=request.speculative,
                media=[media_features(offset, m) for offset, m in prepared.media],
            ),
        )

    def prompt(self, request: Completion | Chat) -> PreparedPrompt:
        """The request's prompt as token ids (checked against the vocabulary), with a chat's
        images and clips prepared for their towers."""
        if isinstance(request, Chat):
            self.check_media_taken(request)
            messages, variables = chat_template_input(request)

            def prepare(part: MediaPart) -> PreparedMedia:
                return self.prepare_media(part, request.max_image_tokens)

            return prepare_chat(self.tokenizer, messages, prepare, **variables)
        if isinstance(request.prompt, str):
            ids = self.tokenizer.encode(request.prompt)
        elif not request.prompt:
            raise RequestRefused("bad_request", "prompt has no tokens")
        else:
            ids = list(request.prompt)
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise RequestRefused(
                "bad_request", f"prompt token id {bad} out of range [0, {self.vocab_size})"
            )
        return PreparedPrompt(np.asarray(ids, dtype=np.int32))

    def check_media_taken(self, request: Chat) -> None:
        """Refuse a chat with images or clips where the server has no tower for them, and a
        `max_image_tokens` the server does not allow."""
        if request.max_image_tokens is not None:
            if self.media is None or not self.media.takes(IMAGE):
                raise RequestRefused("bad_request", "max_image_tokens: this server takes no images")
            self.media.image_budget(request.max_image_tokens)
        for i, message in enumerate(request.messages):
            parts = message.content if isinstance(message.content, list) else ()
            for j, part in enumerate(parts):
                if isinstance(part, protocol.TextPart):
                    continue
                image = isinstance(part, protocol.ImageUrlPart)
                what, tower = ("images", "vision") if image else ("audio", "audio")
                if self.media is None:
                    raise RequestRefused(
                        "bad_request",
                        f"messages[{i}].content[{j}]: this server takes no {what}: it was "
                        "started without --mmproj (the model's projector file)",
                    )
                if not self.media.takes(IMAGE if image else AUDIO):
                    raise RequestRefused(
                        "bad_request",
                        f"messages[{i}].content[{j}]: this server takes no {what}: its "
                        f"projector file has no {tower} encoder",
                    )

    def prepare_media(self, part: MediaPart, max_image_tokens: int | None) -> PreparedMedia:
        """An image (a data URI, at most `max_image_tokens` soft tokens unless its part asks
        otherwise) or a clip (WAV bytes) of a chat, decoded and preprocessed for its tower;
        images given any other way are refused (the server fetches no URL and reads no
        file)."""
        assert self.media is not None  # check_media_taken refused media without a tower
        source = part.source
        if part.kind is IMAGE and not (isinstance(source, str) and source.startswith("data:")):
            raise RequestRefused(
                "bad_request",
                f"image_url {str(source)[:60]!r}: only data: URIs "
                "(data:image/png;base64,...) are accepted; the server fetches no URL",
            )
        return self.media.prepare(part.kind, source, None, part.budget, max_image_tokens)

    def check_limits(self, sampling: SamplingParams) -> None:
        """Refuse stop strings and logprobs past the server's limits."""
        limits = self.config.limits
        if len(sampling.stop) > limits.max_stop_strings:
            raise RequestRefused(
                "bad_request",
                f"{len(sampling.stop)} stop strings; this server takes at most "
                f"{limits.max_stop_strings} (--max-stop-strings)",
            )
        for i, stop in enumerate(sampling.stop):
            if len(stop) > limits.max_stop_chars:
                raise RequestRefused(
                    "bad_request",
                    f"stop[{i}] is {len(stop)} characters; this server takes at most "
                    f"{limits.max_stop_chars} (--max-stop-chars)",
                )
        if sampling.logprobs > limits.max_logprobs:
            raise RequestRefused(
                "bad_request",
                f"logprobs {sampling.logprobs}; this server gives at most "
                f"{limits.max_logprobs} (--max-logprobs)",
            )

    def check_prompt_length(self, n_prompt: int) -> None:
        """Refuse a prompt longer than the server's limit (one longer than the context is
        refused as such, by `max_tokens`)."""
        most = self.config.limits.max_prompt_tokens
        if most is None or most >= self.config.n_ctx:
            return
        if n_prompt > most:
            raise RequestRefused(
                "too_large",
                f"prompt of {n_prompt} tokens; this server takes at most {most} "
                "(--max-prompt-tokens)",
            )

    def max_tokens(self, n_prompt: int, requested: int | None) -> int:
        """How many tokens the request may generate: all it asks, within the context."""
        n_ctx = self.config.n_ctx
        if n_prompt > n_ctx:
            raise RequestRefused(
                "context_length",
                f"prompt of {n_prompt} tokens is longer than the context of {n_ctx} tokens",
            )
        room = room_for_tokens(n_ctx, n_prompt)
        if requested is None:
            return room
        if requested > room:
            raise RequestRefused(
                "context_length",
                f"prompt of {n_prompt} tokens plus max_tokens {requested} exceeds the context "
                f"of {n_ctx} tokens (at most {room} new tokens fit)",
            )
        return requested

    def emit(self, step: StepTokens) -> None:
        """Turn one decode step's tokens into replies."""
        unknown: list[int] = []
        for out in step.outputs:
            state = self.requests.get(out.rid)
            if state is None:
                unknown.append(out.rid)
                continue
            text, reason = state.text.push(out.token_id, out.finish_reason)
            state.token_ids.append(out.token_id)
            if out.cached_tokens is not None:
                state.cached_tokens = out.cached_tokens
            logprobs = self.logprobs_of(state, out)
            if state.stream:
                self.send_chunk(out.rid, state, [out.token_id], text, logprobs)
            else:
                state.pieces.append(text)
                state.token_logprobs.extend(logprobs or ())
            if reason is not None:
                if out.finish_reason is None:  # a stop string: the decode worker goes on
                    unknown.append(out.rid)
                self.finish(out.rid, state, reason)
        if unknown:
            self.mail.send("decode", EndedRequests(rids=unknown))

    @staticmethod
    def logprobs_of(state: TextState, out: TokenOutput) -> list[TokenLogprobs] | None:
        """The token's log-probabilities as the reply carries them, if the request asked."""
        if not state.logprobs or out.logprob is None:
            return None
        return [TokenLogprobs(logprob=out.logprob, top=list(out.top_logprobs or ()))]

    def send_chunk(
        self,
        rid: int,
        state: TextState,
        token_ids: list[int],
        text: str,
        logprobs: list[TokenLogprobs] | None,
    ) -> None:
        chunk = protocol.Chunk(
            id=state.client_id,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs,
            in_reasoning=state.in_reasoning,
        )
        self.outbound(rid, chunk, final=False)

    def finish(self, rid: int, state: TextState, reason: FinishReason) -> None:
        """Send the reply that ends a request and forget it."""
        del self.requests[rid]
        done = protocol.Done(
            id=state.client_id,
            finish_reason=reason,
            prompt_tokens=state.prompt_tokens,
            completion_tokens=len(state.token_ids),
            in_reasoning=state.in_reasoning,
            cached_tokens=state.cached_tokens,
        )
        if not state.stream:
            done.token_ids = state.token_ids
            done.text = "".join(state.pieces)
            done.logprobs = state.token_logprobs if state.logprobs else None
        self.outbound(rid, done, final=True)

    def fail(self, failure: RequestFailure) -> None:
        """End a request the decode worker could not run."""
        state = self.requests.pop(failure.rid, None)
        if state is not None:
            self.reply_error(failure.rid, failure.code, failure.message, state.client_id)

    def forget(self, ended: EndedRequests) -> None:
        """Drop the state of requests that ended elsewhere."""
        for rid in ended.rids:
            self.requests.pop(rid, None)

    def reply_error(self, rid: int, code: ErrorCode, message: str, client_id: int) -> None:
        """End a request with an error reply."""
        self.outbound(rid, Error(id=client_id, code=code, message=message), final=True)

    def outbound(self, rid: int, reply: protocol.ServerReply, final: bool) -> None:
        self.mail.send(
            "frontend",
            EncodedReply(rid=rid, final=final, reply=msgspec.Raw(protocol.encode(reply))),
        )

    takes = protocol.TokenizerInbox
    handlers = {
        AdmittedRequest: start,
        StepTokens: emit,
        RequestFailure: fail,
        EndedRequests: forget,
    }


if __name__ == "__main__":
    run_worker(TokenizerWorker)
