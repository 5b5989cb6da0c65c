"""The OpenAI API's requests and replies as the HTTP front end speaks them.

Requests are pydantic models that FastAPI's ecosystem validates strictly: a field of the wrong
type, a value out of range or a field OpenAI's API does not know is refused (`ApiError`, 400,
naming the field), never guessed at or silently ignored. Replies are built as plain dicts in
the shapes the `openai` SDK parses: `chat.completion`, `chat.completion.chunk`,
`text_completion`, errors as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pygemma4.constraints import check_constraint, tool_call_grammar
from pygemma4.errors import Gemma4Error, SamplingParamsError
from pygemma4.protocol import TOOL_NAME_PATTERN, TokenLogprobs
from pygemma4.sampling import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 128
"""Most sequences one request may ask for (`n`, times the prompts of a completion)."""

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for /v1/completions (chat has none: up to the context)."""


class ApiError(Gemma4Error):
    """A request fails with HTTP `status` and an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The error as OpenAI sends it."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_field(param: str, message: str) -> ApiError:
    """A 400 naming the field `param`."""
    return ApiError(400, message, param=param, code="invalid_value")


# --- Requests --------------------------------------------------------------------------------


class _Strict(BaseModel):
    """Unknown fields are refused and values are not coerced from other types."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ImageUrlIn(_Strict):
    url: str
    """A data: URI (the server fetches no URL)."""
    detail: str | None = None
    """"low", "high" or "auto" (the server checks it)."""


class InputAudioIn(_Strict):
    data: str
    """A WAV file's bytes in base64."""
    format: str = "wav"


_PART_FIELDS = {"text": "text", "image_url": "image_url", "input_audio": "input_audio"}


class ContentPart(_Strict):
    """One part of a multi-part message content: text, an image or a clip."""

    type: str
    text: str | None = None
    image_url: ImageUrlIn | None = None
    input_audio: InputAudioIn | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in _PART_FIELDS:
            raise ValueError(
                f"content parts of type {value!r} are not supported (text, image_url and "
                "input_audio are)"
            )
        return value

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> ContentPart:
        given = {name for name in _PART_FIELDS.values() if getattr(self, name) is not None}
        wanted = _PART_FIELDS[self.type]
        if self.type != "text" and wanted not in given:
            raise ValueError(f"a {self.type} part needs its {wanted!r} field")
        if given - {wanted}:
            raise ValueError(
                f"a {self.type} part has no {', '.join(map(repr, sorted(given - {wanted})))}"
            )
        return self

    @property
    def is_media(self) -> bool:
        return self.type != "text"


# What the server takes as a function's name (what the model can write after `call:`).
ToolName = Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]


class FunctionCallIn(_Strict):
    name: ToolName
    arguments: str
    """The arguments as a JSON object's text."""


class ToolCallIn(_Strict):
    """A tool call of an assistant message in the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Strict):
    """One message of a chat request (the server checks what goes with which role)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessageIn:
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (it may be null only beside tool_calls)")
        return self

    def has_media(self) -> bool:
        """Whether the content holds image or audio parts."""
        return isinstance(self.content, list) and any(part.is_media for part in self.content)

    def text(self) -> str | None:
        """The content as one text (parts joined by newlines, as other servers do)."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    def wire(self) -> dict[str, Any]:
        """The message as the client takes it: text parts joined into one text, or, beside
        images and clips, the parts as they are (each where the chat template puts it)."""
        message = self.model_dump(exclude_none=True)
        if not self.has_media():
            message["content"] = self.text()
        return message


class FunctionIn(_Strict):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_Strict):
    """A tool the model may call."""

    type: Literal["function"]
    function: FunctionIn


class FunctionName(_Strict):
    name: ToolName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


# Counts of tokens: anything beyond 2**31 - 1 is past every context, and past what the
# protocol carries.
PositiveInt = Annotated[int, Field(ge=1, lt=2**31)]
TokenIdInt = Annotated[int, Field(ge=0, lt=2**31)]


class JsonSchemaFormat(_Strict):
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_text(self) -> str | None:
        """The JSON schema the output must follow, as text (None for plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return json.dumps({"type": "object"})
        if self.json_schema is None:
            raise bad_field("response_format.json_schema", "json_schema type needs a json_schema")
        return json.dumps(self.json_schema.schema_ or {})


class _GenerationRequest(_Strict):
    """The fields chat and completions requests share."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    """Keep generating past end-of-generation tokens (vLLM's extension, for benchmarks)."""

    def check_common(self) -> None:
        """What a field's type cannot say: refusals naming the field."""
        if self.logit_bias:
            raise bad_field("logit_bias", "logit_bias is not supported by this server's sampler")
        if self.stream_options is not None and not self.stream:
            raise bad_field("stream_options", "stream_options is only allowed with stream: true")

    def include_usage(self) -> bool:
        """Whether a streamed reply ends with a chunk carrying the usage."""
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, logprobs: int) -> dict[str, Any]:
        """The `SamplingParams` fields this request sets, each checked (400 naming it)."""
        given = {
            name: getattr(self, name)
            for name in (
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "presence_penalty",
                "frequency_penalty",
                "repetition_penalty",
                "seed",
                "stop",
            )
            if getattr(self, name) is not None
        }
        if logprobs:
            given["logprobs"] = logprobs
        for name, value in given.items():
            try:
                SamplingParams(**{name: value})
            except SamplingParamsError as e:
                raise bad_field("top_logprobs" if name == "logprobs" else name, str(e)) from None
        return given


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    max_image_tokens: int | None = None
    """Soft tokens per image at most (this server's extension; it checks the value)."""

    def check_tools(self) -> None:
        """Refusals of tool options this server cannot honour, naming the field."""
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise bad_field("tool_choice", "tool_choice is only allowed when tools are given")
        if self.parallel_tool_calls is False:
            raise bad_field(
                "parallel_tool_calls", "parallel_tool_calls: false cannot be enforced yet"
            )

    def constraint(self) -> dict[str, str]:
        """The sampling constraint this request asks for, checked (400 naming the field): a
        forced tool call's grammar (tool_choice "required" or a named function), or the
        response_format's JSON schema."""
        choice = self.tool_choice
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise bad_field("response_format", "response_format cannot go with a forced tool call")
        if forced:
            assert self.tools  # check_tools refused tool_choice without tools
            tools = [tool.model_dump(exclude_none=True) for tool in self.tools]
            name = choice.function.name if isinstance(choice, NamedToolChoice) else None
            if name is not None and name not in {tool.function.name for tool in self.tools}:
                raise bad_field("tool_choice", f"tool_choice names {name!r}, which is no tool")
            try:
                constraint = {"grammar": tool_call_grammar(tools, name)}
            except SamplingParamsError as e:
                raise bad_field("tools", str(e)) from None
        elif self.response_format is not None and self.response_format.schema_text() is not None:
            constraint = {"json_schema": self.response_format.schema_text() or ""}
        else:
            return {}
        try:
            check_constraint(SamplingParams(**constraint))  # type: ignore[arg-type]
        except SamplingParamsError as e:
            raise bad_field("tools" if forced else "response_format", str(e)) from None
        return constraint

    def chat_options(self) -> dict[str, Any]:
        """The client's chat keyword arguments this request sets: the tools (none where
        tool_choice is "none": the model is not told of them), the template's kwargs and the
        constraint."""
        options: dict[str, Any] = dict(self.constraint())
        if self.tools and self.tool_choice != "none":
            options["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
        if self.chat_template_kwargs:
            options["chat_template_kwargs"] = self.chat_template_kwargs
        if self.max_image_tokens is not None:
            options["max_image_tokens"] = self.max_image_tokens
        return options

    def max_new_tokens(self) -> int | None:
        """The token limit (max_completion_tokens, OpenAI's newer name, wins)."""
        return self.max_completion_tokens or self.max_tokens

    def logprobs_wanted(self) -> int:
        """How many alternatives the server reports with each token (at least 1 where
        logprobs are asked for, since the chosen token's own comes with them)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_field("top_logprobs", "top_logprobs requires logprobs: true")
        return max(1, self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[TokenIdInt] | list[list[TokenIdInt]]
    max_tokens: PositiveInt | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None

    def check_completion(self) -> None:
        """Refusals of what this server does not do, naming the field."""
        if self.echo:
            raise bad_field("echo", "echo is not supported")
        if self.suffix:
            raise bad_field("suffix", "suffix (insertion) is not supported by Gemma 4")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_field("best_of", "best_of other than n is not supported")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request (a list of texts or of token lists is a batch)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[str | list[int]] = [prompt]  # type: ignore[list-item]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts or any(len(p) == 0 for p in prompts if not isinstance(p, str)):
            raise bad_field("prompt", "prompt must not be empty")
        if len(prompts) * self.n > MAX_CHOICES:
            raise bad_field("n", f"prompts × n must be at most {MAX_CHOICES}")
        return prompts


def parse_request(model: type[_Strict], body: Any) -> Any:
    """`body` (parsed JSON) as a request of type `model`; ApiError 400 naming the first field
    that is wrong."""
    _check_unicode(body)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        # Of a union's errors, the deepest says most (a part's field, not "not a string").
        errors = e.errors(include_url=False)
        first = max(errors, key=lambda error: len(error["loc"]))
        param = ".".join(str(part) for part in first["loc"] if not _union_member(part)) or None
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown field (this API does not take it)"
        raise ApiError(
            400, f"{param}: {message}" if param else message, param=param, code="invalid_value"
        ) from None


def _check_unicode(body: Any) -> None:
    """ApiError 400 where the body's text holds a lone surrogate (JSON's `\\ud83d` escape
    alone), which no UTF-8 spells and so no request to the server can carry."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400, f"the body holds text that is not valid Unicode: {e.reason}", code="invalid_json"
        ) from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply", code="invalid_json") from None


def _union_member(part: object) -> bool:
    """Whether a part of a validation error's location names a member of a union of types
    (`str`, `list[int]`), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


# --- Replies ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A reply id as OpenAI makes them ("chatcmpl-...", "cmpl-...")."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """The `created` timestamp of a reply."""
    return int(time.time())


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the server's KV cache held."""

    def plus(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return Usage(
            self.prompt_tokens + prompt_tokens,
            self.completion_tokens + completion_tokens,
            self.cached_tokens + cached_tokens,
        )

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


TokenText = Callable[[int], bytes]
"""The bytes a token id stands for (from the model's tokenizer)."""


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], top: int, token_bytes: TokenText
) -> dict[str, Any]:
    """The `logprobs` of a chat choice (or of one streamed delta)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(token_id)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {
                **entry(token_id, lp.logprob),
                "top_logprobs": [entry(t, v) for t, v in lp.top[:top]],
            }
            for token_id, lp in zip(token_ids, logprobs, strict=True)
        ]
    }


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprobs],
    top: int,
    token_bytes: TokenText,
    text_offset: int,
) -> dict[str, Any]:
    """The `logprobs` of a completion choice (or of one streamed piece), whose text starts
    at `text_offset` characters into the choice's text."""
    tokens = [token_bytes(t).decode("utf-8", "replace") for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [
            {token_bytes(t).decode("utf-8", "replace"): v for t, v in lp.top[:top]}
            for lp in logprobs
        ],
        "text_offset": offsets,
    }
