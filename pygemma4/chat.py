"""Chat templates: a conversation rendered into prompt text exactly as Hugging Face `transformers`
renders it with `tokenizer.apply_chat_template(messages, tokenize=False, chat_template=...)`.

The template sees the same Jinja environment (an immutable sandbox with `trim_blocks`,
`lstrip_blocks`, `{% break %}` / `{% continue %}` and `{% generation %}`, a `tojson` filter that
keeps non-ASCII text, the globals `raise_exception` and `strftime_now`, and guarded `dict` and
`namespace`) and the same variables (`messages`, `add_generation_prompt`, `tools`, `documents`,
the special tokens and any extra keyword arguments) as under `transformers`. Every failure, in the
messages or in the template, is a ChatTemplateError.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from pygemma4.errors import ChatTemplateError

__all__ = ["GEMMA4_TEMPLATE", "ChatTemplate"]

# Whitespace control (`{%-`, `-}}`) drops the indentation and line breaks of the template text, so
# only the expressions produce output.
GEMMA4_TEMPLATE = r"""
{%- macro turn(role, content) -%}
    {%- if content is string -%}
        {%- set text = content -%}
    {%- else -%}
        {%- set parts = namespace(text='') -%}
        {%- for part in content -%}
            {%- if part['type'] != 'text' -%}
                {{- raise_exception('Unsupported content part type: ' + part['type']) -}}
            {%- endif -%}
            {%- set parts.text = parts.text + part['text'] -%}
        {%- endfor -%}
        {%- set text = parts.text -%}
    {%- endif -%}
    {{- '<|turn>' + role + '\n' + (text | trim) + '<turn|>\n' -}}
{%- endmacro -%}
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
    {{- turn('system', messages[0]['content']) -}}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'user' -%}
        {{- turn('user', message['content']) -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- turn('model', message['content']) -}}
    {%- else -%}
        {{- raise_exception('Unsupported role: ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
{%- endif -%}
"""

# Names a message's reasoning may come under; transformers fills the first two from whichever is
# set, because templates read one or the other.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
    """A compiled chat template, with the special tokens it is rendered with."""

    __slots__ = ("_special_tokens", "_template", "source")

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        """Compile `source` (Jinja text) once; `special_tokens` maps variable names such as
        `bos_token` to token texts such as `<bos>`.

        Raises ChatTemplateError for a source that is not a str, special tokens that are not
        str -> str, and a template that does not compile (naming the line and the problem).
        """
        if not isinstance(source, str):
            raise ChatTemplateError(f"a chat template must be a str, not {type(source).__name__}")
        tokens = dict(special_tokens or {})
        for name, text in tokens.items():
            if not isinstance(name, str) or not isinstance(text, str):
                raise ChatTemplateError(
                    f"special token {name!r} must map a str name to a str token text, "
                    f"not {type(text).__name__}"
                )
        self.source: str = source
        self._special_tokens: dict[str, str] = tokens
        try:
            self._template: jinja2.Template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"chat template syntax error on line {e.lineno}: {e.message}"
            ) from None
        except RecursionError:
            raise ChatTemplateError("chat template nests too deeply to compile") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, exactly as `transformers`' `apply_chat_template(
        messages, tokenize=False, add_generation_prompt=..., chat_template=source, **kwargs)`
        renders it with these special tokens.

        Each message is a mapping with a str `role` and a `content` that is a str or a list of
        content parts (mappings with a str `type`, e.g. `{"type": "text", "text": ...}`); keys
        whose value is None are left out, as transformers leaves them out. `add_generation_prompt`
        asks the template to open the model's turn. `template_kwargs` reach the template as
        variables: `tools` (a list of JSON-schema mappings) and `documents` (a list of mappings)
        are None unless given, anything else (e.g. `enable_thinking`) is passed through and may
        override a special token.

        Raises ChatTemplateError naming the problem for malformed messages, tools or documents;
        with the template's own message where the template calls `raise_exception`; and naming
        the line for any other failure inside the template (undefined values, type errors,
        sandbox violations).
        """
        if "continue_final_message" in template_kwargs:
            raise ChatTemplateError("continue_final_message is not supported")
        variables: dict[str, Any] = {**self._special_tokens, **template_kwargs}
        tools = _checked_list(variables.pop("tools", None), "tools", "tool")
        documents = _checked_list(variables.pop("documents", None), "documents", "document")
        context = _template_data(variables)
        context.update(
            messages=_checked_messages(messages),
            tools=_template_data(tools),
            documents=_template_data(documents),
            add_generation_prompt=add_generation_prompt,
        )
        try:
            return self._template.render(context)
        except ChatTemplateError:
            raise
        except Exception as e:
            raise ChatTemplateError(_describe_failure(e)) from None


def _checked_messages(messages: object) -> list[dict[str, Any]]:
    """`messages` validated, as the fresh plain data transformers hands its templates."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes, bytearray)):
        raise ChatTemplateError(
            f"messages must be a list of message mappings, not {type(messages).__name__}"
        )
    if not messages:
        raise ChatTemplateError("messages is empty: a chat needs at least one message")
    chat: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} is not a mapping (got {type(message).__name__})")
        role = message.get("role")
        if role is None:
            raise ChatTemplateError(f"message {i} has no 'role'")
        if not isinstance(role, str):
            raise ChatTemplateError(f"message {i} has a 'role' of type {type(role).__name__}")
        content = message.get("content")
        if content is None:
            raise ChatTemplateError(f"message {i} has no 'content'")
        if not isinstance(content, str):
            _check_content_parts(i, content)
        present = {key: value for key, value in message.items() if value is not None}
        chat.append(_with_reasoning_aliases(_template_data(present)))
    return chat


def _check_content_parts(index: int, content: object) -> None:
    if not isinstance(content, (list, tuple)):
        raise ChatTemplateError(
            f"message {index} has a 'content' of type {type(content).__name__}: "
            "expected a str or a list of content parts"
        )
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ChatTemplateError(
                f"message {index} content part {j} is not a mapping (got {type(part).__name__})"
            )
        if not isinstance(part.get("type"), str):
            raise ChatTemplateError(f"message {index} content part {j} has no str 'type'")


def _with_reasoning_aliases(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    # The key order is what transformers produces; templates that iterate a message see it.
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _checked_list(value: object, name: str, item: str) -> list[Mapping[str, Any]] | None:
    """`value` as a list of mappings (None stays None); `name`/`item` name it in errors."""
    if value is None:
        return None
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
        raise ChatTemplateError(f"{name} must be a list of mappings, not {type(value).__name__}")
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise ChatTemplateError(f"{item} {i} is not a mapping (got {type(entry).__name__})")
    return list(value)


def _template_data(value: Any) -> Any:
    """`value` rebuilt from plain JSON-like types, as transformers rebuilds everything a template
    sees, so the sandbox never meets an object whose methods it cannot judge; an object of any
    other kind becomes the placeholder text `<TypeName>`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy scalars) lose their extra methods.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_template_data(k): _template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return _template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    model_dump = getattr(value, "model_dump", None)  # a pydantic model
    if callable(model_dump):
        return _template_data(model_dump())
    return f"<{type(value).__name__}>"


def _describe_failure(error: Exception) -> str:
    """A message for an error raised while a template rendered, naming the template line."""
    line = None
    tb = error.__traceback__
    while tb is not None:
        # Jinja rewrites the traceback so that template code appears as frames of "<template>".
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" on line {line}" if line is not None else ""
    detail = str(error) or type(error).__name__
    if not isinstance(error, jinja2.TemplateError):
        detail = f"{type(error).__name__}: {detail}"
    return f"chat template failed{where}: {detail}"


def _raise_exception(message: object) -> NoReturn:
    raise ChatTemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike Jinja's own tojson, no HTML escaping, and json.dumps' layout options are exposed.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _DictFactory:
    """The template's `dict`: builds plain dicts, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"a chat template cannot store the underscore-prefixed attribute {name!r} "
            "on a namespace"
        )


class _GuardedNamespace(Namespace):
    """The template's `namespace`: refuses underscore-prefixed names, which could shadow Python
    internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 - lets `namespace(self=...)` work
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers templates use to mark the
    assistant's text for training masks; rendering only emits the body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block, as in transformers, so that `set` inside the block stays inside it.
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    """A Jinja environment configured as transformers configures the one it renders with."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _GuardedNamespace
    return env
