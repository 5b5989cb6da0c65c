"""pygemma4: Gemma 4 GGUF inference with a C++ core."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pygemma4.config import LayerConfig, ModelConfig, ModelFile, open_model
from pygemma4.errors import (
    ChatTemplateError,
    Gemma4Error,
    GGUFError,
    SamplingParamsError,
    TokenizerError,
    UnsupportedModelError,
)
from pygemma4.sampling import SamplingParams
from pygemma4.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pygemma4.client import (
        AsyncClient,
        BadReplyError,
        Client,
        ClientClosedError,
        CompletionResult,
        RequestCancelledError,
        RequestTimeoutError,
        ServerBusyError,
        ServerError,
        WorkerFailedError,
    )
    from pygemma4.engine import (
        ContextFullError,
        Engine,
        GenerationSequence,
        NoFreeSequenceError,
    )
    from pygemma4.runner import ModelRunner, RollbackError

# The engine needs the compiled core, and the client ZeroMQ: loading them on first use keeps the
# file-level modules (GGUF reading, config, tokenizer, sampling, demo model) importable where the
# extension is not built, and `import pygemma4` light.
_LAZY_MODULES = {
    "engine": ("ContextFullError", "Engine", "GenerationSequence", "NoFreeSequenceError"),
    "runner": ("ModelRunner", "RollbackError"),
    "client": (
        "AsyncClient",
        "BadReplyError",
        "Client",
        "ClientClosedError",
        "CompletionResult",
        "RequestCancelledError",
        "RequestTimeoutError",
        "ServerBusyError",
        "ServerError",
        "WorkerFailedError",
    ),
}
_LAZY_NAMES = {name: module for module, names in _LAZY_MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is not None:
        return getattr(importlib.import_module(f"pygemma4.{module}"), name)
    raise AttributeError(f"module 'pygemma4' has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "BadReplyError",
    "ChatTemplateError",
    "Client",
    "ClientClosedError",
    "CompletionResult",
    "ContextFullError",
    "Engine",
    "GGUFError",
    "Gemma4Error",
    "GenerationSequence",
    "LayerConfig",
    "ModelConfig",
    "ModelFile",
    "ModelRunner",
    "NoFreeSequenceError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "RollbackError",
    "SamplingParams",
    "SamplingParamsError",
    "ServerBusyError",
    "ServerError",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedModelError",
    "WorkerFailedError",
    "open_model",
]
