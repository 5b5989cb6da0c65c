"""pygemma4: Gemma 4 GGUF inference with a C++ core."""

from __future__ import annotations

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
    from pygemma4.engine import (
        ContextFullError,
        Engine,
        GenerationSequence,
        NoFreeSequenceError,
    )

# The engine needs the compiled core; loading it on first use keeps the file-level modules
# (GGUF reading, config, tokenizer, sampling, demo model) importable where the extension is not
# built.
_ENGINE_NAMES = {"ContextFullError", "Engine", "GenerationSequence", "NoFreeSequenceError"}


def __getattr__(name: str) -> Any:
    if name in _ENGINE_NAMES:
        from pygemma4 import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'pygemma4' has no attribute {name!r}")


__all__ = [
    "ChatTemplateError",
    "ContextFullError",
    "Engine",
    "GGUFError",
    "Gemma4Error",
    "GenerationSequence",
    "LayerConfig",
    "ModelConfig",
    "ModelFile",
    "NoFreeSequenceError",
    "SamplingParams",
    "SamplingParamsError",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedModelError",
    "open_model",
]
