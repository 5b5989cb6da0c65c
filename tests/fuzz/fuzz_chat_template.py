"""Fuzz target: chat templates and the messages rendered through them (pygemma4.chat).

`data` is a template's source, a NUL byte, then the render's input as JSON (`{"messages":
[...], "add_generation_prompt": ..., "kwargs": {...}}`; where that part is not such JSON, it is
the content of one user message). Templates come from files anyone can publish, so whatever
they do must end in a ChatTemplateError inside the sandbox, in bounded time.
"""

from __future__ import annotations

import json

from harness import main, text_of

from pygemma4.chat import ChatTemplate
from pygemma4.errors import ChatTemplateError

SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>"}


def fuzz_one(data: bytes) -> None:
    """Compile the template before `data`'s first NUL and render the input after it."""
    source, _, rest = data.partition(b"\0")
    try:
        template = ChatTemplate(text_of(source), SPECIAL_TOKENS)
    except ChatTemplateError:
        template = None
    messages, add_generation_prompt, kwargs = _render_input(text_of(rest))
    if template is None:
        return
    template.render(messages, add_generation_prompt, **kwargs)


def _render_input(text: str) -> tuple[object, bool, dict[str, object]]:
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        spec = None
    if not isinstance(spec, dict):
        return [{"role": "user", "content": text}], True, {}
    kwargs = spec.get("kwargs")
    if not isinstance(kwargs, dict):
        kwargs = {}
    return spec.get("messages"), bool(spec.get("add_generation_prompt", True)), kwargs


if __name__ == "__main__":
    main(fuzz_one)
