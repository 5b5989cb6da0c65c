"""The exceptions pygemma4 raises for bad input."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class Gemma4Error(Exception):
    """Base of every error pygemma4 raises on purpose."""


class GGUFError(Gemma4Error, ValueError):
    """The file is not a readable GGUF: missing, not GGUF, corrupt, truncated or inconsistent."""


class UnsupportedModelError(Gemma4Error, ValueError):
    """The file is a valid GGUF, but not a Gemma 4 model this engine can run.

    Raised for a wrong architecture, an unsupported tensor type, a missing or unexpected
    tensor, a tensor shape that contradicts the metadata, or hyperparameters outside what the
    engine implements.
    """


@contextmanager
def located(path: os.PathLike[str] | str) -> Iterator[None]:
    """Name `path` at the front of the message of any Gemma4Error raised inside the block."""
    try:
        yield
    except Gemma4Error as e:
        # The same exception, so that a subclass's own attributes survive.
        e.args = (f"{path}: {e}",)
        raise e from None


class TokenizerError(Gemma4Error, ValueError):
    """The GGUF's tokenizer metadata is unusable, or text or ids cannot be converted."""


class ChatTemplateError(Gemma4Error, ValueError):
    """Messages are malformed, or the chat template rejected them or failed to render."""


class ChatTemplateLimitError(ChatTemplateError):
    """A chat template went past one of the bounds of `pygemma4.template_limits` while it
    rendered; `limit` is the name of that bound (e.g. "RENDER_SECONDS")."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit

    def __reduce__(self) -> tuple[type[ChatTemplateLimitError], tuple[str, str]]:
        return type(self), (self.limit, str(self))


class MediaError(Gemma4Error, ValueError):
    """An image or other media input cannot be decoded or is not one the model can take."""


class SamplingParamsError(Gemma4Error, ValueError):
    """A sampling parameter is out of its range or of the wrong type."""


def require_positive(name: str, value: int) -> None:
    """Raise ValueError unless `value` is an int (not a bool) of at least 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
